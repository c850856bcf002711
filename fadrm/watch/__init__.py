"""Scheduled re-distillation: start a run only when something is stale, safely unattended.

``fadrm watch`` asks the lineage which stages of a run are stale (a teacher checkpoint, the
data or the config changed, or a stage never finished), looks at the runs of this run name
on a *target*, and acts on what it finds:

* ``skip-up-to-date``      -- every stage is done: nothing to do (no cluster call at all);
* ``skip-already-running`` -- a run with the same fingerprints is active (running, queued,
                              retrying or suspended), or an active run carries no
                              fingerprints (applied by hand): never a second one beside it;
* ``backoff``              -- ``max_failures`` runs for the same fingerprints already ended
                              without making the run up to date: create nothing more for
                              them, record why (a Kubernetes Warning Event on the last failed
                              RayJob) and exit 3 (:data:`EXIT_BACKOFF`) so the CronJob shows
                              the failure. New fingerprints (a new teacher, config or data)
                              lift it, and so does deleting those failed runs (the Event and
                              the log print the exact ``kubectl delete``);
* ``submit``               -- otherwise: create run number ``attempt`` for the fingerprints.

Whatever it decides, runs the watch created for *other* fingerprints are obsolete and are
deleted: a running one is stopped (deleting a RayJob makes KubeRay stop the Ray job and
delete its cluster), a finished or failed one is tidied away (it is no longer a back-off
record). Runs created by hand (without the ``app.kubernetes.io/managed-by: fadrm-watch``
label) are never touched.

Creation is idempotent: a run's name is derived from its fingerprints and attempt number
(``fadrm-<run>-<hash>-<attempt>``, :func:`rayjob_name`), so two watches racing (a manual
``kubectl create job --from=cronjob/fadrm-watch`` beside the schedule) create at most one
run; the loser gets ``AlreadyExists``, which is success when the existing run carries the
same fingerprints.

How KubeRay states count (:func:`rayjob_record`): ``Complete`` with job status
``SUCCEEDED`` succeeded; ``Complete`` with ``STOPPED`` (``ray job stop``) was cancelled: the
watch deletes it, because KubeRay's ``deletionRules`` only match SUCCEEDED/FAILED and its
cluster would otherwise stay up, and it does not count as a failure; ``Failed`` (after
KubeRay's own ``backoffLimit`` retries) and ``ValidationFailed`` (the spec was refused, it
never ran) are failures; ``Suspended`` (queued by Kueue, or paused by a person) is *active*:
the watch never starts a duplicate beside it, warns when it has been suspended longer than a
day, and deletes it like any other run once its fingerprints are obsolete. A run that
finished successfully while the stages are still stale also counts as a failed attempt, so
a run that "succeeds" without producing its outputs cannot loop forever either.

Two targets share one small interface (``runs`` / ``submit`` / ``stop`` /
``record_backoff``, :class:`fadrm.watch.command.Target`). They talk to a cluster, so they
live in the launch layer, ``ray_jobs/watch_targets.py``, and the library finds them through
the ``fadrm.watch_targets`` entry point group (as ``fadrm.executors``):

* ``KubernetesTarget`` (``--target kubernetes``) creates KubeRay ``RayJob``s from a
  template: the ``RayCronJob`` ``fadrm-run-template`` of k8s/base (kept ``suspend: true``,
  so KubeRay never schedules it), read from the API so that every kustomize overlay
  (``images:``, ``namespace:``, patches) reaches the runs; or a YAML file (dry runs from a
  workstation).
* ``RayJobsTarget`` (``--target ray``) submits to a Ray Jobs API address with
  ``JobSubmissionClient`` (for ``ray job submit`` users); the fingerprints travel as job
  metadata, the deterministic name is the submission id, and the run config is shipped in
  the job's ``working_dir``.

Here, in the library: the decision (:mod:`fadrm.watch.decision`: :func:`decide`, run
records, run names), the RayJob rendering and KubeRay's lifecycle checks
(:mod:`fadrm.watch.rayjob`), both pure, and the check-and-act loop with its arguments
(:mod:`fadrm.watch.command`); only the targets talk to a cluster. Nothing here logs
credentials: S3 keys, the Ray auth token and the Kubernetes token are read by the
libraries, never printed.
"""

from fadrm.watch.command import (
    TARGETS,
    Target,
    add_watch_arguments,
    create_target,
    run_watch,
    watch,
)
from fadrm.watch.decision import (
    ACTIVE,
    BACKOFF,
    DEFAULT_MAX_FAILURES,
    DELETING,
    EXIT_BACKOFF,
    FAILED,
    LABEL_ATTEMPT,
    LABEL_CONFIG,
    LABEL_DATA,
    LABEL_MANAGED_BY,
    LABEL_RUN,
    LABEL_TEACHERS,
    MANAGER,
    SKIP_RUNNING,
    SKIP_UP_TO_DATE,
    STOPPED,
    SUBMIT,
    SUCCEEDED,
    Decision,
    RunRecord,
    decide,
    fingerprint_labels,
    label_value,
    rayjob_name,
    rayjob_name_prefix,
)
from fadrm.watch.rayjob import (
    ANNOTATION_REASON,
    DEFAULT_TEMPLATE,
    LABEL_KUEUE_QUEUE,
    lifecycle_problems,
    load_template_file,
    rayjob_record,
    render_rayjob,
    template_from_object,
)

__all__ = [
    "LABEL_CONFIG",
    "LABEL_TEACHERS",
    "LABEL_DATA",
    "LABEL_RUN",
    "LABEL_ATTEMPT",
    "LABEL_MANAGED_BY",
    "LABEL_KUEUE_QUEUE",
    "ANNOTATION_REASON",
    "MANAGER",
    "SUBMIT",
    "SKIP_UP_TO_DATE",
    "SKIP_RUNNING",
    "BACKOFF",
    "ACTIVE",
    "SUCCEEDED",
    "FAILED",
    "STOPPED",
    "DELETING",
    "DEFAULT_MAX_FAILURES",
    "DEFAULT_TEMPLATE",
    "EXIT_BACKOFF",
    "RunRecord",
    "Decision",
    "decide",
    "fingerprint_labels",
    "label_value",
    "rayjob_name",
    "rayjob_name_prefix",
    "rayjob_record",
    "render_rayjob",
    "template_from_object",
    "load_template_file",
    "lifecycle_problems",
    "TARGETS",
    "Target",
    "create_target",
    "watch",
    "add_watch_arguments",
    "run_watch",
]
