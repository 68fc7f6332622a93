"""One lock for building and loading torch modules, for processes that do it in several
threads (a worker: its task threads load models on first use, its follower loads refiner
versions).

diffusers' and transformers' ``from_pretrained`` build their modules inside accelerate's
``init_empty_weights``, which patches ``torch.nn.Module`` for the whole process, not for the
calling thread. A module built in another thread meanwhile gets meta parameters, and two
loads that overlap can leave the patch in place for good: every module built afterwards in
the process is on the meta device (six threads loading one refiner did it at once).
"""

import threading

BUILDING = threading.RLock()
