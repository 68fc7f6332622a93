"""``celery -A worker.celery_cli ...``: the app for Celery's own tools (``inspect``,
``flower``) and for a callbacks worker, configured from the environment (``REFINERY_*``).

Model queues are served by ``refinery worker`` only, in Celery's thread pool: it loads the
models once before consuming. A worker started from here on a model queue would take jobs
it cannot run, so it refuses to start.
"""

from celery.signals import celeryd_after_setup

from shared.routing import model_queues
from shared.settings import get_settings
from worker.app import make_app

settings = get_settings()
app = make_app(settings)


@celeryd_after_setup.connect
def _refuse_model_queues(sender: str, instance, **_: object) -> None:
    consumed = set(instance.app.amqp.queues.consume_from or instance.app.amqp.queues)
    if refused := sorted(consumed & set(model_queues(settings))):
        raise SystemExit(f"queues {refused} need the models: start them with `refinery worker --queues ...`")
