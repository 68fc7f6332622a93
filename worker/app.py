"""The Celery app workers run (``celery -A worker.app worker`` works too; ``refinery worker``
adds the right pool and loads the models before consuming)."""

from shared.broker import make_celery
from shared.settings import get_settings

app = make_celery(get_settings(), include=["worker.tasks"])
