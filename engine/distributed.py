"""One run on several processes, through torch.distributed as it is: torchrun starts the processes,
DDP or FSDP2's ``fully_shard`` syncs the gradients, and nothing here is a launcher or a process group of
its own.

A :class:`Dist` says which process this is and does the few things a run needs across processes. With
one process (``world_size`` 1) every method hands back what it was given and calls nothing, so a run in
one process (a thread in the window, ``tunedeck-train``, ``torchrun --nproc-per-node 1``) computes
exactly what it computed before.

What makes N processes x batch b the same run as 1 process x batch N*b:

- The step plan counts micro-batches of all processes together (``N*b`` examples). Every process draws
  the same shuffled order, so each knows the whole micro-batch and takes its share (:meth:`Dist.shard`):
  process r takes examples ``[r*k//N, (r+1)*k//N)`` of its k examples.
- The loss is normalised by the target tokens of the whole accumulation window of all processes, which
  every process counts on the host from the shared order (no collective). As DDP and FSDP average
  gradients over processes, each process divides its summed loss by ``targets / N``: the average is then
  the gradient of the whole window's mean loss.
- Gradients are synced on the last micro-batch of a window only (DDP ``no_sync``, FSDP2
  ``set_requires_gradient_sync``); loss, gradient norm and each process's memory are reduced once per
  step in one all-reduce and read from the device once (under FSDP2 the norm of the shards takes one
  all-reduce of its own first); the non-finite decision reads that one result, so it is the same on
  every process, and so are the autopilot's.
- Dropout streams differ per process: after the shared initialisation each process seeds its RNG with
  ``seed + rank``.

Commands: rank 0 alone reads them (its queue: CLI, control file, window) and broadcasts what it has at
every step boundary, an empty list included; every process applies the same list in the same order.
While paused, rank 0 broadcasts about every second, so a pause of any length never trips the process
group's timeout. Broadcasts go through a gloo group, so on GPUs they cost no device sync.

Checkpoints: every process takes part (FSDP2 gathers the full state to rank 0's CPU), rank 0 writes the
one-process layout, and every process waits until it has: a rollback or the autopilot then reads the
run folder as rank 0 left it. Every process reads a checkpoint to resume or roll back, so on several
machines the run folder must be on a filesystem they share.

Failures: a process that fails writes its error into torchrun's key-value store before it exits; the
collective that then fails on rank 0 (or torchrun's SIGTERM) ends the run there with that error.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from tunedeck.engine.config import Config
from tunedeck.engine.data import IGNORE_INDEX
from tunedeck.engine.errors import ConfigError, TunedeckError

# The longest a process waits in one collective before its process group gives up: long enough for rank
# 0 to write a large checkpoint or generate a long sample while the others wait. A process that dies is
# noticed at once all the same (a closed connection, or torchrun's SIGTERM to the others).
TIMEOUT = timedelta(minutes=30)
HEARTBEAT_S = 1.0  # while paused, rank 0 broadcasts at least this often
FAILED_KEY = "tunedeck/failed/{}"


class PeerFailure(TunedeckError):
    """Another process of the run failed or vanished; this one ends with its error."""


@dataclass
class StepReading:
    """A step's numbers, reduced over the processes: one host read."""

    loss: float
    grad_norm: float
    memory: dict[str, Any] = field(default_factory=dict)


def under_launcher() -> bool:
    """True in a process that torchrun (or any env:// launcher) started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if under_launcher() else 1


def check(cfg: Config, world_size: int) -> None:
    """Refuse, before any work, what a run on ``world_size`` processes cannot do."""
    if world_size <= 1 or cfg.train.distributed != "fsdp":
        return
    if cfg.model.load_in_4bit or cfg.model.load_in_8bit:
        which = "model.load_in_4bit" if cfg.model.load_in_4bit else "model.load_in_8bit"
        raise ConfigError(
            f"train.distributed=fsdp cannot shard a quantized base model ({which}=true): FSDP2 shards "
            "plain tensors, not bitsandbytes' packed 4-bit/8-bit weights",
            "use train.distributed=ddp (QLoRA in every process), or turn quantization off",
        )


def example_counts(examples: list[dict]) -> tuple[int, int]:
    """(target tokens, tokens) of examples, as ``data.count_targets`` and the step's token count count
    them on a collated batch: the label at position 0 never counts, padding is not a token."""
    targets = sum(sum(1 for label in ex["labels"][1:] if label != IGNORE_INDEX) for ex in examples)
    return targets, sum(len(ex["input_ids"]) for ex in examples)


class Dist:
    """Which process this is, and the run's collectives. ``Dist()`` is the one-process run."""

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int = 0,
        strategy: str = "ddp",
        device: torch.device | None = None,
        control: Any = None,
    ) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.strategy = strategy
        self.device = device  # None: the model module picks (one process)
        self._control = control  # the gloo group for objects (None: the default group)
        self._fsdp_root: Any = None

    # ------------------------------------------------------------ who am I

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shards(self) -> bool:
        """True when each process holds only a shard of the weights (FSDP2)."""
        return self.enabled and self.strategy == "fsdp"

    def describe(self) -> dict[str, Any]:
        """For the start event: nothing in one process."""
        return {"world_size": self.world_size, "distributed": self.strategy} if self.enabled else {}

    @classmethod
    def from_env(cls, strategy: str) -> Dist:
        """Join the process group torchrun set up in the environment; one process without one.
        One device per local rank: nccl on CUDA, gloo on the CPU."""
        import torch.distributed as dist

        world = launched_world_size()
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            if local >= count:
                raise ConfigError(
                    f"process {rank} has local rank {local}, but this machine shows {count} GPU(s)",
                    "start at most one process per GPU (--nproc-per-node)",
                )
            device, backend = torch.device("cuda", local), "nccl"
            torch.cuda.set_device(device)
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
        control = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else None
        return cls(rank, world, local, strategy, device, control)

    def enter(self) -> None:
        """In the thread that trains: CUDA's current device is per thread."""
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def close(self) -> None:
        import torch.distributed as dist

        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------ model and data

    def seed(self, seed: int) -> None:
        """After the shared initialisation: a dropout stream per process."""
        if self.enabled:
            torch.manual_seed(seed + self.rank)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module a training step calls: DDP around ``model``, or ``model`` itself sharded in place by
        FSDP2 (per decoder layer, then the transformer as the root), or ``model`` in one process."""
        if not self.enabled:
            return model
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device] if self.device is not None and self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        assert self.device is not None
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        # The transformer under any peft wrapper is the root, so generate() (which peft hands to it)
        # runs the root's forward, the hook that gathers embeddings and head, as training does.
        get_base = getattr(model, "get_base_model", None)
        root = get_base() if callable(get_base) else model
        layers = set(getattr(root, "_no_split_modules", None) or ())
        for module in root.modules():
            if module is not root and type(module).__name__ in layers:
                fully_shard(module, mesh=mesh)
        self._fsdp_root = fully_shard(root, mesh=mesh)
        return model

    def shard(self, examples: list[dict]) -> list[dict]:
        """This process's share of a micro-batch; a share left empty at an epoch's end is one example
        without targets, so every process still runs the forward and backward its collectives need."""
        if not self.enabled:
            return examples
        k, n, r = len(examples), self.world_size, self.rank
        mine = examples[r * k // n : (r + 1) * k // n]
        return mine or [_without_targets(examples[0])]

    def loss_items(self, targets: int) -> float | int:
        """``num_items_in_batch`` for each process, so the average of the processes' gradients is the
        gradient of the window's loss normalised by its ``targets`` (see the module's docstring)."""
        return targets / self.world_size if self.enabled else targets

    def sync_gradients(self, train_model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: gradients are synced on the window's last only."""
        if not self.enabled:
            return contextlib.nullcontext()
        if self.strategy == "ddp":
            return contextlib.nullcontext() if last else train_model.no_sync()  # type: ignore[operator]
        self._fsdp_root.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """The total gradient norm (clipped to ``max_norm``), the same on every process: under FSDP2 the
        norm of the shards is a DTensor, made whole here."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full = getattr(norm, "full_tensor", None)
        return full() if callable(full) else norm

    def reduce_step(
        self, loss_sum: torch.Tensor, grad_norm: torch.Tensor, memory: dict[str, float]
    ) -> StepReading:
        """One all-reduce of every process's (loss, grad norm, memory) row, one host read. The loss is
        the mean of the processes' (each already normalised by the window's targets / N), the norm
        rank 0's (equal on all), memory the maximum with each process's peak in ``mem_peak_mb_ranks``."""
        import torch.distributed as dist

        keys = ("mem_allocated_mb", "mem_reserved_mb", "mem_peak_mb")
        rows = torch.zeros((self.world_size, 2 + len(keys)), dtype=torch.float64, device=loss_sum.device)
        rows[self.rank, 0] = loss_sum.detach().double()
        rows[self.rank, 1] = grad_norm.detach().double().to(loss_sum.device)
        rows[self.rank, 2:] = torch.tensor([memory[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(rows)
        table = rows.tolist()
        losses, norms = [r[0] for r in table], [r[1] for r in table]
        # Any process's non-finite value makes the step non-finite on all: they read the same table.
        finite = all(math.isfinite(v) for v in losses + norms)
        loss = sum(losses) / self.world_size if finite else math.nan
        mem: dict[str, Any] = {k: max(r[2 + i] for r in table) for i, k in enumerate(keys)}
        mem["mem_peak_mb_ranks"] = [r[4] for r in table]
        return StepReading(loss, norms[0] if finite else math.nan, mem)

    # ------------------------------------------------------------ commands and objects

    def share(self, items: list[Any]) -> list[Any]:
        """Rank 0's ``items`` on every process (the others' are ignored)."""
        return list(self.from_main(items)) if self.enabled else items

    def from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any."""
        if not self.enabled:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        return bool(t.item())

    def barrier(self) -> None:
        """Every process waits for the others here (through the gloo group: no device sync)."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier(group=self._control)

    def any_of(self, check: Callable[[], bool]) -> Callable[[], bool]:
        return check if not self.enabled else (lambda: self.any(check()))

    # ------------------------------------------------------------ evaluation

    def eval_share(self, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """This process's eval batches (every N-th); under FSDP2 all processes run as many forwards (the
        shards are gathered in each), so the short ones get batches without targets."""
        if not self.enabled:
            return batches
        mine = batches[self.rank :: self.world_size]
        if self.shards:
            rounds = math.ceil(len(batches) / self.world_size)
            mine += [_batch_without_targets(batches[0])] * (rounds - len(mine))
        return mine

    def sum(self, value: torch.Tensor) -> float:
        """``value`` summed over the processes, read once."""
        if not self.enabled:
            return float(value)
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value)
        return float(value)

    # ------------------------------------------------------------ checkpoints

    def model_state(self, model: torch.nn.Module, trainable_only: bool) -> dict[str, Any] | None:
        """Under FSDP2, the full weights gathered to rank 0's CPU (``{}`` on the others); None otherwise:
        each process holds them whole, and rank 0 saves its own."""
        if not self.shards:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
        )
        state = get_model_state_dict(model, options=options)
        # A tied weight (the head sharing the embeddings) is gathered under each name; the one-process
        # file has it once, as save_pretrained writes it from the model itself.
        once = {n for n, _ in model.named_parameters()}
        tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - once
        return {k: v for k, v in state.items() if k not in tied}

    def optimizer_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any] | None:
        """Under FSDP2, the full optimizer state on rank 0's CPU in the one-process layout (parameters
        numbered in the optimizer's order); None otherwise (rank 0 saves its own)."""
        if not self.shards:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        by_name: dict[str, Any] = get_optimizer_state_dict(model, optimizer, options=options)
        if not self.is_main:
            return {}
        index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
        return {
            "state": {index[name]: s for name, s in by_name["state"].items()},
            "param_groups": [
                {**g, "params": [index[name] for name in g["params"]]} for g in by_name["param_groups"]
            ],
        }

    def load_weights(self, model: torch.nn.Module, folder: Path) -> None:
        """Under FSDP2, a checkpoint's weights (every process read the same file) into the shards of
        this process: an adapter's names get the adapter's name back, as peft loads them."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        adapter, full = folder / "adapter_model.safetensors", folder / "model.safetensors"
        if not adapter.is_file() and not full.is_file():
            raise ConfigError(f"{folder} holds no weights", "give a complete checkpoint folder")
        saved: dict[str, Any] = load_file(adapter if adapter.is_file() else full)
        names = {n for n, _ in model.named_parameters()}
        if adapter.is_file():  # peft writes "...lora_A.weight" for the parameter "...lora_A.default.weight"
            by_saved = {_without_adapter(n): n for n in names}
            unknown = sorted(k for k in saved if k not in by_saved)
            if unknown:
                raise ConfigError(
                    f"the adapter in {folder} does not fit this model ({unknown[0]})",
                    "resume with the model the checkpoint was made with",
                )
            saved = {by_saved[k]: v for k, v in saved.items()}
        else:
            saved = {k: v for k, v in saved.items() if k in names}
        set_model_state_dict(model, saved, options=StateDictOptions(full_state_dict=True, strict=False))

    def load_optimizer(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Under FSDP2, a one-process optimizer state (every process read the same file) into the
        shards of this process."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = _param_names(model, optimizer)
        by_name: dict[str, Any] = {
            "state": {names[int(i)]: s for i, s in state["state"].items()},
            "param_groups": [
                {**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]
            ],
        }
        set_optimizer_state_dict(
            model, optimizer, by_name, options=StateDictOptions(full_state_dict=True, strict=False)
        )

    def rng_states(self) -> list[dict[str, torch.Tensor]] | None:
        """Every process's RNG state, gathered on all (None in one process)."""
        if not self.enabled:
            return None
        import torch.distributed as dist

        mine: dict[str, torch.Tensor] = {"cpu": torch.get_rng_state()}
        if self.device is not None and self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, mine, group=self._control)
        return out

    def restore_rng(self, rng: dict[str, Any], seed: int) -> None:
        """Each process's own stream when the checkpoint has one per process of this run's count;
        otherwise rank 0 continues the saved stream and the others start their own from the seed."""
        ranks = rng.get("ranks")
        if isinstance(ranks, list) and len(ranks) == self.world_size:
            mine = ranks[self.rank]
            torch.set_rng_state(mine["cpu"])
            if "cuda" in mine and self.device is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
            return
        torch.set_rng_state(rng["cpu"])
        if self.rank > 0:
            torch.manual_seed(seed + self.rank)

    # ------------------------------------------------------------ failures

    def _store(self) -> Any:
        import torch.distributed as dist

        if not dist.is_initialized():
            return None
        # The launcher's key-value store: torchrun's agent holds it, so it outlives any worker.
        return dist.distributed_c10d._get_default_store()

    def report_failure(self, message: str, kind: str, advice: str) -> None:
        """Leave this process's fatal error where rank 0 reads it when its collectives fail."""
        store = self._store() if self.enabled else None
        if store is None:
            return
        with contextlib.suppress(Exception):  # the store's host may be gone too
            store.set(
                FAILED_KEY.format(self.rank), json.dumps({"message": message, "kind": kind, "advice": advice})
            )

    def failures(self, wait_s: float = 0.0) -> dict[int, dict[str, str]]:
        """The errors other processes left, waiting up to ``wait_s`` for a first one."""
        store = self._store() if self.enabled else None
        if store is None:
            return {}
        deadline = time.monotonic() + wait_s
        while True:
            found: dict[int, dict[str, str]] = {}
            for r in range(self.world_size):
                key = FAILED_KEY.format(r)
                with contextlib.suppress(Exception):
                    if r != self.rank and store.check([key]):
                        found[r] = json.loads(store.get(key))
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(0.1)

    def peer_failure(self, error: BaseException) -> PeerFailure | None:
        """``error`` explained as another process's failure, or None when it is this process's own."""
        failed = self.failures(wait_s=2.0 if _is_comm_error(error) else 0.0)
        if failed:
            r, e = min(failed.items())
            return PeerFailure(
                f"process {r} of {self.world_size} failed: {e['message']}",
                kind=e.get("kind", "internal"),
                advice=e.get("advice", ""),
            )
        if _is_comm_error(error):
            return PeerFailure(
                "another process of the run stopped answering (killed, or it crashed without a word): "
                + _what_failed(error),
                kind="internal",
                advice="torchrun's report names the process and how it ended; resume from the last checkpoint",
            )
        return None


def _is_comm_error(error: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text
        for s in ("Connection closed by peer", "Connection reset by peer", "NCCL", "gloo", "Broken pipe")
    )


def _without_adapter(name: str) -> str:
    """A peft parameter's name as its adapter file names it (the adapter's name dropped)."""
    return re.sub(r"\.(lora_[A-Za-z_]+)\.[^.]+(\.|$)", r".\1\2", name)


def _what_failed(error: BaseException) -> str:
    """The backend's words, without its source location and its sign-off."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". ")[0].rstrip(".")


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its own order (the one-process state's numbering)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _without_targets(example: dict) -> dict:
    return {**example, "labels": [IGNORE_INDEX] * len(example["labels"])}


def _batch_without_targets(batch: dict[str, Any]) -> dict[str, Any]:
    return {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
