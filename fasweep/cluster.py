"""The Ray cluster a launch runs on: its address probed before anything waits on it (`check_address`), joined or
started locally (`init_ray`), and what fits it: each trial's CPUs and GPUs (`check_fits`), each pack's memory
(`check_memory`), how many packs of a stage run at once (`slots_of`).
"""

from __future__ import annotations

import logging
from typing import Any

from fasweep.errors import UserError
from fasweep.faults import human_bytes, unreachable
from fasweep.preflight import footprints
from fasweep.spec.plan import Plan, PlannedTrial
from fasweep.torch_env import apply_torch_env


def init_ray(address: str | None, num_cpus: int | None, code: list[str]) -> bool:
    """Connect to `address` or start a local Ray, shipping the user's `code` folders to its workers (runtime_env
    `py_modules`) and, on a cluster, `fasweep.torch_env`'s variables (a local Ray's workers inherit this process's
    environment); False when Ray was already up in this process."""
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    runtime_env: dict[str, Any] = {"py_modules": code} if code else {}
    if address:
        ray.init(address=address, runtime_env={**runtime_env, "env_vars": apply_torch_env()}, **options)
    else:
        # A local Ray talks over loopback only (Ray otherwise swaps 127.0.0.1 for the host's IP address). The
        # switch is read while the node starts; restored after, so a later ray.init(address=...) is unaffected.
        from ray._private import ray_constants

        saved, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
        try:
            ray.init(num_cpus=num_cpus, runtime_env=runtime_env or None, **options)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = saved
    return True


def check_address(address: str | None) -> None:
    """A Ray `--address` (HOST:PORT; `auto` finds a local cluster itself) where nothing answers fails in seconds,
    in one line: Ray would wait for its GCS for many minutes."""
    if not address or address == "auto":
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError.field("--address", address, "HOST:PORT of a Ray cluster's GCS (e.g. head:6379) or auto")
    reason = unreachable(host.strip("[]"), int(port))
    if reason:
        raise UserError.field(
            "--address",
            address,
            f"the GCS address of a running Ray cluster ({reason}); start one (`ray start --head`) or leave out "
            "--address for a local Ray",
        )


def check_fits(trials: tuple[PlannedTrial, ...], *, local: bool) -> None:
    """Refuse, before any compute, a trial that asks for more CPUs/GPUs than a local Ray has (it would wait
    forever); a remote cluster may autoscale, so there the trials simply queue."""
    import ray

    if not local:
        return
    total = ray.cluster_resources()
    for kind in ("cpu", "gpu"):
        need = max(t.resources[kind] for t in trials)
        have = total.get(kind.upper(), 0.0)
        if need > have:
            raise UserError.field(
                f"resources.{kind}", need, f"at most {have:g} on this machine's Ray (--set resources.{kind}={have:g})"
            )


def slots_of(plan: Plan) -> dict[str, int]:
    """How many packs of each stage the Ray cluster runs at once: its CPUs and GPUs over a pack's (the stage's
    `resources`), at most `max_concurrent`; at least 1."""
    import ray

    total = ray.cluster_resources()
    slots = {}
    for stage in plan.stages:
        need = plan.stage_trials(stage)[0].resources
        fits = [total.get(kind.upper(), 0.0) / need[kind] for kind in ("cpu", "gpu") if need[kind] > 0]
        slots[stage] = max(1, min(int(f + 1e-6) for f in fits))  # Ray counts resources in 1e-4 units
        slots[stage] = min(slots[stage], plan.spec.max_concurrent or slots[stage])
    return slots


def check_memory(plan: Plan, slots: dict[str, int]) -> None:
    """Refuse, before any compute, a trial (or pack) whose nets' state, gradients and optimizer moments exceed the
    memory of the largest Ray node: it would grow until the node kills it."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    memory = max((r.get("memory", 0.0) + r.get("object_store_memory", 0.0) for r in nodes), default=0.0)
    if not memory:
        return
    sizes = footprints(plan)
    for stage in plan.stages:
        for members in plan.packs(stage, slots=slots[stage]):
            need = [sizes[t.key] for t in members]
            total = sum(f.memory for f in need if f is not None)
            if total > memory:
                t, f = members[0], need[0]
                who = t.key if len(members) == 1 else f"the pack of {t.key} ({len(members)} trials)"
                per = " per trial" if len(members) > 1 else ""
                parts = f"state {human_bytes(f.state)}, gradients {human_bytes(f.gradients)}" if f else ""
                parts = f" ({parts}, optimizer moments {human_bytes(f.moments)}{per})" if f else ""
                raise UserError.field(
                    "model.arch",
                    t.config["model"]["arch"],
                    f"a net whose training state fits a worker's memory: {who} needs {human_bytes(total)}{parts}, "
                    f"more than the {human_bytes(memory)} of the largest Ray node",
                )
