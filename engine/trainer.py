"""The training loop, in the order of torchtune's recipes: setup (model, data, plan, optimizer and
schedule, then a checkpoint's state when resuming), train, evaluate and save, and live commands at
each optimizer-step boundary.

A straight loop rather than transformers' Trainer: Trainer fixes gradient accumulation per epoch
and its schedulers overwrite live LR changes. An optimizer step takes the next micro-batches of the
:class:`~tunedeck.engine.plan.StepPlan`, and the loss is normalised by the target tokens of the whole
window, so batch 2 x accumulation 4 equals batch 8 x accumulation 1. The loss and gradient norm are
read from the device once per optimizer step, together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from tunedeck.engine import (
    attention,
    autopilot,
    checkpoint,
    data,
    distributed,
    durable,
    liger,
    live,
    lr_find,
    oom,
    optim,
    packing,
    precision,
    preflight,
    sampling,
)
from tunedeck.engine import config as config_mod
from tunedeck.engine import model as model_mod
from tunedeck.engine import resume as resume_mod
from tunedeck.engine import rollback as rollback_mod
from tunedeck.engine.config import Config
from tunedeck.engine.distributed import Dist
from tunedeck.engine.errors import ConfigError, TunedeckError
from tunedeck.engine.monitor import step_memory
from tunedeck.engine.plan import StepPlan
from tunedeck.engine.protocol import (
    Cancel,
    ChangeEvent,
    CheckpointEvent,
    Command,
    EndEvent,
    ErrorEvent,
    Eval,
    EvalEvent,
    Event,
    FindLR,
    LrFindEvent,
    Pause,
    ProgressEvent,
    Resume,
    Rollback,
    RollbackEvent,
    Sample,
    SampleEvent,
    Save,
    Set,
    StartEvent,
    StateEvent,
    StepEvent,
    Stop,
    WarningEvent,
)
from tunedeck.engine.schedule import LRSchedule, warmup_steps_for

OOM_ADVICE = (
    "lower train.per_device_train_batch_size and raise train.gradient_accumulation_steps, "
    "lower data.max_length, load the model in 4-bit (model.load_in_4bit) or turn on "
    "model.gradient_checkpointing"
)
NAN_ADVICE = (
    "lower the learning rate (set learning_rate) or max_grad_norm, then resume; the weights were not updated"
)
NAN_STOP_ADVICE = (
    "resume from that checkpoint with a lower train.learning_rate or train.max_grad_norm; "
    "run with --control FILE to pause on a non-finite loss instead of ending"
)
NONFINITE = ("pause", "stop")


class _Cancelled(Exception):
    """Cancel was asked for while the run was still being set up."""


class Trainer:
    """One run. ``cfg`` is the run's whole config (for a resume, the checkpoint's, with any changes);
    ``resume`` the checkpoint it continues. ``cancel``, when set, ends the run at the next boundary
    and stops a generation between tokens, ahead of any queued command; during setup, between its
    stages. ``on_nonfinite``: what a non-finite loss does: ``pause`` (someone can change the LR and
    resume: the window, a control file) or ``stop`` (a run nobody can resume ends as failed, with the
    last finite weights saved). ``dist`` is this process's place in a run on several processes
    (:mod:`tunedeck.engine.distributed`); by default the only one. ``leave_a_core_free``: on the CPU,
    train on all cores but one, for a window that shares the process. ``find_lr_only``: after setting
    up, run that learning-rate range test instead of training, and end."""

    def __init__(
        self,
        cfg: Config,
        emit: Callable[[Event], None],
        commands: queue.Queue[Command],
        resume: checkpoint.Resumed | None = None,
        on_run_dir: Callable[[Path], None] | None = None,
        cancel: threading.Event | None = None,
        leave_a_core_free: bool = False,
        find_lr_only: FindLR | None = None,
        on_nonfinite: str = "pause",
        dist: Dist | None = None,
    ) -> None:
        if on_nonfinite not in NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE}, not {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.nonfinite: tuple[float, float] | None = None
        self.checkpoint_bytes = 0  # the size of the last checkpoint written
        self._low_space_warned = False
        self.cfg = cfg
        self.dist = dist or Dist()
        self.emit = emit
        self.commands = commands
        self.resume = resume
        self.on_run_dir = on_run_dir
        self.cancel = cancel or threading.Event()
        self.leave_a_core_free = leave_a_core_free
        self.find_lr_only = find_lr_only
        self.state = "loading"
        self.plan: StepPlan | None = None
        self.change_log: list[dict[str, Any]] = []
        self.run_dir: Path | None = None
        self.elapsed_before = 0.0
        self.step_time_ema = 0.0
        self.last_lr = 0.0
        self.compiled: str | None = None
        self._order_epoch = -1
        self._order_cache: list[int] = []
        self.healer = oom.Healer(self)
        self.live = live.LiveSettings(self)
        self.autopilot = autopilot.Autopilot(cfg.train.autopilot)
        self.parent: str | None = None  # the run this one was resumed from, in a new folder

    @property
    def step(self) -> int:
        return self.plan.step if self.plan is not None else 0

    # ------------------------------------------------------------ lifecycle

    def run(self) -> EndEvent:
        """Everything from loading to the end event; user mistakes become error events, never exceptions."""
        status = "failed"
        try:
            self._set_state("loading")
            self.dist.enter()
            self.setup()
            status = self.train() if self.find_lr_only is None else self._find_lr_and_end(self.find_lr_only)
        except _Cancelled:
            status = "cancelled"
        except TunedeckError as e:
            self.emit(ErrorEvent(message=e.message, kind=e.kind, advice=e.advice))
        except torch.OutOfMemoryError:
            self._release_memory()
            self.emit(
                ErrorEvent(message=f"out of memory at step {self.step + 1}", kind="oom", advice=OOM_ADVICE)
            )
        except Exception as e:
            # On several processes, a collective that fails because another process failed ends this one
            # with that process's error; anything else is this process's own bug.
            failure = self.dist.peer_failure(e) if self.dist.enabled else None
            if failure is None:
                raise
            self.emit(ErrorEvent(message=failure.message, kind=failure.kind, advice=failure.advice))
        output = None
        if status in ("completed", "stopped") and self.run_dir is not None:
            output = str(self.run_dir / ("final" if self.find_lr_only is None else lr_find.RESULT_FILE))
        self._set_state("finished")
        return EndEvent(status=status, step=self.step, output=output)

    def setup(self) -> None:
        t = self.cfg.train
        preflight.check(
            self.cfg,
            self.resume.folder if self.resume is not None else None,
            world_size=self.dist.world_size,
            writes_run_folder=self.dist.is_main,
        )
        torch.manual_seed(t.seed)
        self._setup_model()
        self.dist.seed(t.seed)
        self._check_cancel()
        self._setup_data()
        self._check_cancel()
        self.plan = StepPlan.create(
            len(self.train_examples),
            t.per_device_train_batch_size * self.dist.world_size,  # examples of all processes together
            t.gradient_accumulation_steps,
            t.num_train_epochs,
            t.max_steps,
        )
        self._distribute()
        self._setup_optimizer(self.plan.total_steps)
        if self.resume is not None:
            self._restore(self.resume)
        if t.torch_compile:
            self._compile()
        self._open_run_dir()
        self.emit(self._start_event())
        if self.resume is not None:
            self._apply_resumed_values(self.resume)

    def _setup_model(self) -> None:
        self.emit(ProgressEvent(stage="model", done=0, total=1))
        self.loaded = model_mod.load(self.cfg, self.dist.device)
        if self.loaded.device.type == "cpu" and self.leave_a_core_free:
            _leave_a_core_free()
        self.model, self.tokenizer, self.device = self.loaded.model, self.loaded.tokenizer, self.loaded.device
        oom.install_fault(self.model)
        self.varlen = attention.enable_varlen(
            self.model, self.cfg.data.packing, self.device, self.loaded.dtype
        )
        self.emit(ProgressEvent(stage="model", done=1, total=1))

    def _setup_data(self) -> None:
        cfg = self.cfg
        splits = data.load_examples(cfg.data, self.tokenizer, cfg.train.seed, progress=self.emit)
        self.train_examples, self.eval_examples = splits.train, splits.eval
        self.data_format = splits.format
        self.data_info = {
            "train_examples": len(splits.train),
            "eval_examples": len(splits.eval),
            "format": splits.format,
            "dropped": splits.dropped,
        }
        if splits.dropped:
            self.emit(
                WarningEvent(
                    message=f"{splits.dropped} examples had no answer token left within "
                    f"data.max_length={cfg.data.max_length} and were dropped",
                    kind="data",
                    advice="raise data.max_length to keep them",
                )
            )

    def _distribute(self) -> None:
        """The module a training step calls: DDP's wrapper, or the model itself (in one process, or
        sharded in place by FSDP2)."""
        self.train_model = self.dist.wrap(self.model)

    def _setup_optimizer(self, total_steps: int) -> None:
        t = self.cfg.train
        params = list(self.model.named_parameters())
        self.trainable = [p for _, p in params if p.requires_grad]
        self.optimizer = optim.build(
            optim.actual_name(t.optim, self.device),
            optim.param_groups(params, t.weight_decay),
            t,
            t.learning_rate,
        )
        warmup = warmup_steps_for(total_steps, t.warmup_steps, t.warmup_ratio)
        self.schedule = LRSchedule(
            t.lr_scheduler_type, t.learning_rate, total_steps, warmup, t.lr_scheduler_kwargs
        )

    def _restore(self, resume: checkpoint.Resumed, rewind: bool = False) -> None:
        """Weights, optimizer, schedule, data position, change log and RNG, as the checkpoint left them.
        ``rewind`` (a rollback in a running trainer): also the live values and optimizer type the run
        had then; the elapsed time and the autopilot's firing counts go on."""
        assert self.plan is not None
        state = resume.state
        if rewind:
            self._rewind_live_values(resume.cfg.train)
        if self.dist.shards:
            self.dist.load_weights(self.model, resume.folder)
            self.dist.load_optimizer(self.model, self.optimizer, checkpoint.read_optimizer(resume.folder))
        else:
            checkpoint.load_weights(self.model, resume.folder)
            checkpoint.load_optimizer(self.optimizer, resume.folder)
        self.schedule.load_state_dict(state["schedule"])
        if "plan" in state:
            self.plan = StepPlan.from_state(state["plan"])
        else:
            self.plan = StepPlan.from_micro_count(self.plan, state)
        self.change_log = list(state.get("change_log", []))
        if not rewind:
            self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.autopilot.load_state_dict(state.get("autopilot", {}), keep_counts=rewind)
        self.last_lr = self.schedule.last_lr()
        if self.dist.enabled:
            self.dist.restore_rng(checkpoint.read_rng(resume.folder), self.cfg.train.seed)
        else:
            checkpoint.load_rng(resume.folder)
        self._fit_processes(int(state.get("world_size", 1)))

    def _fit_processes(self, saved: int) -> None:
        """A checkpoint of N processes on M: the micro-batch of all processes together stays, so the same
        examples make each step; each process's share is what changes."""
        assert self.plan is not None
        n = self.dist.world_size
        if saved == n:
            return
        total = self.plan.batch_size
        if total % n:
            fits = ", ".join(str(d) for d in range(1, total + 1) if total % d == 0)
            raise ConfigError(
                f"the checkpoint's micro-batch of {total} examples (all {saved} processes together) "
                f"does not split evenly over {n} processes",
                f"resume on {fits} processes",
            )
        t = self.cfg.train
        if t.per_device_train_batch_size != total // n:
            self.emit(
                WarningEvent(
                    message=f"resumed on {n} process(es) a run of {saved}: per_device_train_batch_size "
                    f"{t.per_device_train_batch_size} -> {total // n}, so each micro-batch still takes "
                    f"{total} examples in all and the run goes on as it was",
                    kind="config",
                    advice="if that does not fit in memory, resume on more processes",
                )
            )
            t.per_device_train_batch_size = total // n

    def _rewind_live_values(self, then: config_mod.TrainConfig) -> None:
        t = self.cfg.train
        if then.optim != t.optim:  # a fresh optimizer of the checkpoint's kind, to load its state into
            self.optimizer = optim.build(
                optim.actual_name(then.optim, self.device),
                optim.param_groups(self.model.named_parameters(), then.weight_decay),
                then,
                then.learning_rate,
            )
        for key in resume_mod.live_keys():
            setattr(t, key, getattr(then, key))
        self.autopilot.configure(t.autopilot)

    def _apply_resumed_values(self, resume: checkpoint.Resumed) -> None:
        """Values given anew on resume, applied at the resume step as one change with source resume."""
        if not resume.apply and not resume.setup:
            return
        changes, auto = self.live.apply(self.live.check(resume.apply))
        self._record({**changes, **resume.setup}, "resume")
        if auto:
            self._record(auto, "auto")

    def _compile(self) -> None:
        """torch.compile the model in place (``Module.compile``), so parameter names, checkpoints,
        ``generate`` and live changes see the same module as without it."""
        t = self.cfg.train
        for key, value, default in (
            ("torch_compile_backend", "cudagraphs", "inductor"),
            ("torch_compile_mode", "reduce-overhead", "default"),
        ):
            if self.device.type != "cuda" and getattr(t, key) == value:
                raise ConfigError(
                    f"train.{key}={value} needs a CUDA GPU (it records CUDA graphs)",
                    f"set train.{key}={default} on this machine",
                )
        kwargs: dict[str, Any] = {"backend": t.torch_compile_backend}
        if t.torch_compile_backend == "inductor" and t.torch_compile_mode != "default":
            kwargs["mode"] = t.torch_compile_mode
        self.model.compile(**kwargs)
        self.compiled = t.torch_compile_backend + (f" ({kwargs['mode']})" if "mode" in kwargs else "")

    def _open_run_dir(self) -> None:
        if self.dist.is_main:
            self._make_run_dir()
        # The other processes only name it (events, checkpoint paths); rank 0 alone writes there.
        self.run_dir = self.dist.from_main(self.run_dir)

    def _make_run_dir(self) -> None:
        home = resume_mod.home(self.resume, self.cfg.train) if self.resume is not None else None
        if home is not None:
            self.run_dir = home
        else:
            root = Path(self.cfg.train.output_dir)
            if self.resume is not None:  # a new folder for a resume: beside its parent unless told where
                root = resume_mod.output_root(self.resume, self.cfg.train)
            name = self.cfg.train.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
            self.run_dir = durable.make_run_dir(root, name)
        run_dir, resume = self.run_dir, self.resume
        if resume is not None and home is None:
            self.parent = self._write_or_warn(
                resume_mod.PARENT_FILE, lambda: resume_mod.write_parent(run_dir, resume)
            )
        # Every checkpoint holds its config too: a run whose copy here cannot be written goes on.
        self._write_or_warn("config.yaml", lambda: config_mod.save(self.cfg, run_dir / "config.yaml"))
        if self.on_run_dir is not None:
            self.on_run_dir(self.run_dir)

    def _write_or_warn(self, name: str, write: Callable[[], Any]) -> Any:
        """Write a file of the run folder and return what ``write`` returns; one that cannot be
        written is a warning (None returned), and the run goes on."""
        assert self.run_dir is not None
        try:
            return write()
        except OSError as e:
            self.emit(
                WarningEvent(
                    message=f"could not write {self.run_dir / name}: {durable.describe(e, self.run_dir)}",
                    kind="config",
                    advice=durable.WRITE_ADVICE,
                )
            )
            return None

    def _start_event(self) -> StartEvent:
        assert self.plan is not None and self.run_dir is not None
        attn = self.cfg.model.attn_implementation
        return StartEvent(
            run_id=self.run_dir.name,
            config=self.cfg.to_dict(),
            model={
                **self.loaded.info(),
                "compiled": self.compiled,
                "attention": f"{attention.VARLEN} ({self.varlen})" if self.varlen else attn,
                "optimizer": optim.actual_name(self.cfg.train.optim, self.device),
                "threads": torch.get_num_threads(),
                **self.dist.describe(),
            },
            data=self.data_info,
            total_steps=self.plan.total_steps,
            run_dir=str(self.run_dir),
            resumed_from=str(self.resume.folder) if self.resume else None,
            changes=list(self.change_log),
            step=self.step,
            parent=self.parent,
        )

    @contextlib.contextmanager
    def _compute(self) -> Iterator[None]:
        """Around every forward pass of the model: bf16 autocast and Liger's RoPE where they apply."""
        with (
            precision.autocast(self.device, self.loaded.dtype, self.model),
            liger.fused_rope(self.loaded.liger_rope),
        ):
            yield

    # ------------------------------------------------------------ the loop

    def train(self) -> str:
        t = self.cfg.train
        assert self.plan is not None
        self._set_state("running")
        self.model.train()
        self.t0 = time.perf_counter()
        start_step = self.plan.step
        while True:
            # After the last step this boundary still answers commands; a rollback there trains on.
            verdict = self._boundary()
            if verdict is not None or self.plan.done:
                return self._finish(verdict or "completed")
            plan = self.plan  # a rollback at the boundary replaces it
            began = time.perf_counter()
            loss, grad_norm, tokens = self.healer.run(self._optimizer_step)
            if loss is None:  # non-finite: nothing was updated
                if self.nonfinite is not None and self.on_nonfinite == "stop":
                    return self._finish("nonfinite")
                continue  # paused (or the autopilot acts)
            # The loss read inside the step synchronised the device, so this is the step's true time.
            step_time = time.perf_counter() - began
            first = plan.step == start_step + 1
            self.step_time_ema = step_time if first else 0.9 * self.step_time_ema + 0.1 * step_time
            if plan.step % t.logging_steps == 0 or plan.done:
                self._emit_step(loss, grad_norm, tokens, step_time)
            self.autopilot.observe_step(plan.step, loss)
            # At the end too, as HF Trainer and TRL do, so a run's last word is an eval loss.
            if t.eval_steps and (plan.step % t.eval_steps == 0 or plan.done) and len(self.eval_examples):
                self.evaluate()
            if t.save_steps and plan.step % t.save_steps == 0 and not plan.done:
                self.save_checkpoint()

    def _order(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s shuffled order of the training examples."""
        if self._order_epoch != epoch:
            g = torch.Generator().manual_seed(self.cfg.train.seed + epoch)
            self._order_cache = torch.randperm(len(self.train_examples), generator=g).tolist()
            self._order_epoch = epoch
        return self._order_cache

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {
                k: v.pin_memory().to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()
            }
        return batch

    def _next_batches(self) -> tuple[list[dict[str, Any]], int, int]:
        """This process's collated micro-batches of the next optimizer step (the plan moves past them),
        with the target tokens and the tokens of the whole step, all processes together."""
        assert self.plan is not None
        pad, packed = self.tokenizer.pad_token_id, self.cfg.data.packing
        out = []
        targets = tokens = 0
        for s in self.plan.next_step():
            order = self._order(s.epoch)
            examples = [self.train_examples[order[i]] for i in range(s.start, s.stop)]
            if self.dist.enabled:
                n_targets, n_tokens = distributed.example_counts(examples)
                targets, tokens = targets + n_targets, tokens + n_tokens
                examples = self.dist.shard(examples)
            out.append(packing.prepare_batch(data.collate(examples, pad, packing=packed), bool(self.varlen)))
        if not self.dist.enabled:
            # Counted on the host before the copy, so normalising costs no device sync.
            targets = sum(data.count_targets(b) for b in out)
            tokens = sum(
                int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                for b in out
            )
        return out, max(1, targets), tokens

    def _optimizer_step(self) -> tuple[float | None, float | None, int]:
        assert self.plan is not None
        t = self.cfg.train
        batches, n_targets, tokens = self._next_batches()
        items = self.dist.loss_items(n_targets)
        loss_sum = torch.zeros((), device=self.device)
        for i, b in enumerate(batches):
            with self.dist.sync_gradients(self.train_model, last=i == len(batches) - 1):
                with self._compute():
                    out = self.train_model(**self._to_device(b), num_items_in_batch=items)
                out.loss.backward()
            loss_sum += out.loss.detach()
        clip = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        if self.dist.enabled:
            grad_norm = self.dist.clip_grad_norm(self.trainable, clip)
            reading = self.dist.reduce_step(loss_sum, grad_norm, step_memory(self.device))
            loss, norm, self._memory = reading.loss, reading.grad_norm, reading.memory
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
            loss, norm = torch.stack([loss_sum.float(), grad_norm.float().to(loss_sum.device)]).tolist()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            if self.autopilot.nonfinite(self.step + 1, loss, norm):
                self.emit(
                    WarningEvent(
                        message=f"loss {loss} / grad norm {norm} at step {self.step + 1} is not finite; "
                        "the batch is skipped and the autopilot acts on it",
                        kind="nan",
                        advice="",
                    )
                )
                return None, None, tokens
            self.nonfinite = (loss, norm)
            if self.on_nonfinite == "stop":
                return None, None, tokens
            self.emit(
                WarningEvent(
                    message=f"loss {loss} / grad norm {norm} at step {self.step + 1} is not finite; "
                    "paused before the optimizer step; that batch is skipped",
                    kind="nan",
                    advice=NAN_ADVICE,
                )
            )
            self._set_state("paused")
            return None, None, tokens
        lr = self.schedule.lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with self.healer.updating():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_lr = lr
        self.schedule.advance()
        self.plan.finish_step()
        return loss, norm, tokens

    def _emit_step(self, loss: float, grad_norm: float | None, tokens: int, step_time: float) -> None:
        assert self.plan is not None
        plan = self.plan
        self.emit(
            StepEvent(
                step=plan.step,
                epoch=plan.epoch,
                loss=loss,
                learning_rate=self.last_lr,
                grad_norm=grad_norm,
                gradient_accumulation_steps=plan.accumulation,
                tokens=tokens,
                tokens_per_s=tokens / step_time if step_time > 0 else 0.0,
                step_time_s=step_time,
                elapsed_s=self.elapsed_before + time.perf_counter() - self.t0,
                eta_s=self.step_time_ema * (plan.total_steps - plan.step),
                total_steps=plan.total_steps,
                # Several processes: read in the step's reduction (the maximum, and each one's peak).
                **(self._memory if self.dist.enabled else step_memory(self.device)),
            )
        )

    # ------------------------------------------------------------ commands

    def _boundary(self) -> str | None:
        """Apply the autopilot's firings, then queued commands; block while paused. Returns
        'stopped'/'cancelled' to end the loop."""
        verdict = self._autopilot_boundary()
        if verdict is not None:
            return verdict
        if self.dist.enabled:
            return self._shared_boundary()
        while True:
            if self.cancel.is_set():
                return "cancelled"
            try:
                cmd = self.commands.get(block=self.state == "paused", timeout=0.1)
            except queue.Empty:
                if self.state == "paused":
                    continue
                return None
            verdict = self._apply(cmd)
            if verdict is not None:
                return verdict

    def _shared_boundary(self) -> str | None:
        """On several processes: rank 0's commands, broadcast, applied by every process in the same order.
        While paused, rank 0 broadcasts at least every ``HEARTBEAT_S`` (an empty list when nothing came)."""
        while True:
            for cmd in self.dist.share(self._main_commands() if self.dist.is_main else []):
                verdict = self._apply(cmd)
                if verdict is not None:
                    return verdict
            if self.state != "paused":
                return None

    def _main_commands(self) -> list[Command]:
        """What rank 0 has for this boundary: a cancel ahead of all, else every queued command (while
        paused, waiting up to a heartbeat for one)."""
        if self.cancel.is_set():
            return [Cancel()]
        out: list[Command] = []
        with contextlib.suppress(queue.Empty):
            if self.state == "paused":
                out.append(self.commands.get(timeout=distributed.HEARTBEAT_S))
            while True:
                out.append(self.commands.get_nowait())
        if self.dist.shards:
            # Under FSDP2 every process generates, in step: they must draw the same tokens.
            out = [
                dataclasses.replace(c, seed=random.SystemRandom().randrange(2**63))
                if isinstance(c, Sample) and c.seed is None and c.temperature > 0
                else c
                for c in out
            ]
        return [Cancel()] if self.cancel.is_set() else out

    def _apply(self, cmd: Command) -> str | None:
        try:
            match cmd:
                case Stop():
                    return "stopped"
                case Cancel():
                    return "cancelled"
                case Pause():
                    _require(self.state == "running", "pause: the run is already paused", "send resume")
                    self._set_state("paused")
                case Resume():
                    _require(self.state == "paused", "resume: the run is not paused", "send pause first")
                    self._set_state("running")
                case Set(values=values):
                    self.apply_set(values)
                case Rollback():
                    self.rollback(cmd.checkpoint, cmd.values)
                case Save():
                    self.save_checkpoint()
                case Eval():
                    _require(
                        bool(len(self.eval_examples)),
                        "eval: this run has no eval split",
                        "set data.eval_fraction above 0 for the next run",
                    )
                    self.evaluate()
                case Sample():
                    self.sample(cmd.prompt, cmd.options())
                case FindLR():
                    _require(
                        self.state == "paused" or self.step == 0,
                        "find_lr: the run is training",
                        "send pause first (find_lr runs before the first step or while paused)",
                    )
                    _require(
                        not self.dist.enabled,
                        f"find_lr: this run goes on {self.dist.world_size} processes; the range test "
                        "runs on one",
                        "run tunedeck-train --find-lr on one process, then set the learning rate it suggests",
                    )
                    self.find_lr(cmd)
                case _:
                    raise ConfigError(f"unknown command {cmd!r}", "see DESIGN.md for commands")
        except TunedeckError as e:
            self.emit(ErrorEvent(message=e.message, kind=e.kind, advice=e.advice))
        return None

    def apply_set(
        self, values: dict[str, Any], source: str = "user", rule: str = "", reason: str = ""
    ) -> None:
        """Validate all values first, then apply all: a refused set changes nothing."""
        changes, auto = self.live.apply(self.live.check(values))
        if changes:
            self._record(changes, source, rule, reason)
        if auto:
            self._record(auto, "auto")

    def _record(self, changes: dict[str, list[Any]], source: str, rule: str = "", reason: str = "") -> None:
        entry: dict[str, Any] = {"step": self.step, "changes": changes, "source": source}
        entry.update({k: v for k, v in (("rule", rule), ("reason", reason)) if v})
        self.change_log.append(entry)
        self.emit(ChangeEvent(step=self.step, changes=changes, source=source, rule=rule, reason=reason))

    # ------------------------------------------------------------ rollback and autopilot

    def rollback(
        self, name: str, values: dict[str, Any], source: str = "user", rule: str = "", reason: str = ""
    ) -> None:
        """Back to a checkpoint of this run, in memory, then ``values`` at that step; recorded as one
        change (``step`` from -> to, and the values)."""
        changes, auto = self._rollback(name, values)
        self._record(changes, source, rule, reason)
        if auto:
            self._record(auto, "auto")

    def _rollback(
        self, name: str, values: dict[str, Any]
    ) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        assert self.run_dir is not None
        folder = rollback_mod.resolve(self.run_dir, name, self.step)
        resumed = checkpoint.open_resume(folder)
        # Checked as a resume checks them, against the checkpoint's values, before anything is restored.
        checked = self.live.check(resume_mod.rollback_values(resumed.cfg, values), resumed.cfg.train)
        from_step = self.step
        self._restore(resumed, rewind=True)
        branch = (
            rollback_mod.open_branch(self.run_dir, from_step, self.step, folder.name)
            if self.dist.is_main
            else None
        )
        self.dist.barrier()  # on several processes the others go on with the run folder as rank 0 left it
        self.emit(
            RollbackEvent(from_step=from_step, to_step=self.step, checkpoint=folder.name, branch=branch)
        )
        changes, auto = self.live.apply(checked)
        return {"step": [from_step, self.step], **changes}, auto

    def _autopilot_boundary(self) -> str | None:
        """Apply what the autopilot's rules decided since the last boundary, each firing as one change."""
        for note in self.autopilot.notes:
            self.emit(
                WarningEvent(message=note, kind="config", advice="raise its max_firings to let it act again")
            )
        self.autopilot.notes.clear()
        if not self.autopilot.pending() or self.run_dir is None:
            return None
        ctx = autopilot.Context.of_run(self.step, self.run_dir, self.cfg.train.learning_rate)
        for firing in self.autopilot.decide(ctx):
            try:
                verdict = self._fire(firing)
            except TunedeckError as e:
                self.emit(
                    ErrorEvent(message=f"autopilot {firing.rule}: {e.message}", kind=e.kind, advice=e.advice)
                )
                continue
            if verdict is not None:
                return verdict
        return None

    def _fire(self, firing: autopilot.Firing) -> str | None:
        changes: dict[str, list[Any]] = {}
        auto: dict[str, list[Any]] = {}
        verdict = None
        for cmd in firing.commands:
            match cmd:
                case Rollback():
                    done, caused = self._rollback(cmd.checkpoint, cmd.values)
                    changes.update(done)
                    auto.update(caused)
                case Set(values=values):
                    done, caused = self.live.apply(self.live.check(values))
                    changes.update(done)
                    auto.update(caused)
                case Save():
                    assert self.run_dir is not None
                    if not (self.run_dir / "checkpoints" / checkpoint.step_dir_name(self.step)).is_dir():
                        self.save_checkpoint()
                case Stop():
                    changes["state"] = [self.state, "stopping"]
                    verdict = "stopped"
        if firing.record:
            self._record(changes, "autopilot", firing.rule, firing.reason)
        if auto:
            self._record(auto, "auto")
        return verdict

    # ------------------------------------------------------------ eval / sample / save

    @torch.no_grad()
    def evaluate(self) -> float:
        was_training = self.model.training
        self.model.eval()
        bs = self.cfg.train.per_device_eval_batch_size
        pad = self.tokenizer.pad_token_id
        n = len(self.eval_examples)
        batches = [
            packing.prepare_batch(
                data.collate(
                    [self.eval_examples[j] for j in range(i, min(i + bs, n))],
                    pad,
                    packing=self.cfg.data.packing,
                ),
                bool(self.varlen),
            )
            for i in range(0, n, bs)
        ]
        n_targets = max(1, sum(data.count_targets(b) for b in batches))
        total = torch.zeros((), device=self.device)
        for b in self.dist.eval_share(batches):
            with self._compute():
                total += self.model(**self._to_device(b), num_items_in_batch=n_targets).loss.float()
        loss = self.dist.sum(total)
        self.model.train(was_training)
        self.autopilot.observe_eval(self.step, loss)
        self.emit(EvalEvent(step=self.step, eval_loss=loss, perplexity=math.exp(min(loss, 50.0))))
        return loss

    def sample(self, prompt: str, options: sampling.SamplingOptions) -> str:
        if self.dist.enabled and not self.dist.shards and not self.dist.is_main:
            return ""  # under DDP rank 0 generates alone; the others wait at the next boundary
        text = sampling.generate(
            self.model,
            self.tokenizer,
            self.data_format,
            prompt,
            options,
            compute=self._compute,
            # Under FSDP2 every process generates: all stop at the same token when rank 0 is cancelled.
            should_stop=self.dist.any_of(self.cancel.is_set) if self.dist.shards else self.cancel.is_set,
        )
        self.emit(SampleEvent(step=self.step, prompt=prompt, text=text))
        return text

    def find_lr(self, options: FindLR) -> LrFindEvent:
        """A learning-rate range test on the run as it is; the run is left exactly as it was."""
        event = lr_find.find(self, options)
        self.emit(event)
        return event

    def _find_lr_and_end(self, options: FindLR) -> str:
        self._set_state("running")
        self.find_lr(options)
        return "cancelled" if self.cancel.is_set() else "completed"

    def sampler(self) -> sampling.Sampler | None:
        """The model as it is now, for generation after the run (None when it never loaded)."""
        if not hasattr(self, "model"):
            return None
        return sampling.Sampler(self.model, self.tokenizer, self.data_format, compute=self._compute)

    def trainer_state(self) -> dict[str, Any]:
        assert self.plan is not None
        t0 = getattr(self, "t0", time.perf_counter())
        return {
            "step": self.step,
            "total_steps": self.plan.total_steps,
            "plan": self.plan.state_dict(),
            "gradient_accumulation_steps": self.plan.accumulation,
            "optim": self.cfg.train.optim,
            "schedule": self.schedule.state_dict(),
            "change_log": self.change_log,
            "elapsed_s": self.elapsed_before + time.perf_counter() - t0,
            "run_id": self.run_dir.name if self.run_dir else None,
            "data_format": self.data_format,
            "autopilot": self.autopilot.state_dict(),
            "world_size": self.dist.world_size,
        }

    def save_checkpoint(self, folder: Path | None = None, with_optimizer: bool = True) -> Path | None:
        """Write a checkpoint; a failed write is an error event and the run goes on (None returned)."""
        assert self.run_dir is not None
        folder = folder or self.run_dir / "checkpoints" / checkpoint.step_dir_name(self.step)
        # On several processes all take part (FSDP2 gathers the full state to rank 0); rank 0 writes.
        gathered = checkpoint.Gathered(
            model=self.dist.model_state(self.model, trainable_only=self.cfg.lora.enabled),
            optimizer=self.dist.optimizer_state(self.model, self.optimizer) if with_optimizer else None,
            rng_ranks=self.dist.rng_states() if with_optimizer else None,
        )
        path = self._write_checkpoint(folder, with_optimizer, gathered) if self.dist.is_main else folder
        # The others go on once rank 0 has written it: a rollback or the autopilot may read it next.
        self.dist.barrier()
        return path

    def _write_checkpoint(
        self, folder: Path, with_optimizer: bool, gathered: checkpoint.Gathered
    ) -> Path | None:
        optimizer = self.optimizer if with_optimizer else None
        self._warn_low_space(folder, optimizer)
        try:
            path = checkpoint.write(
                folder,
                model=self.model,
                tokenizer=self.tokenizer,
                cfg=self.cfg,
                state=self.trainer_state(),
                optimizer=optimizer,
                gathered=gathered,
            )
        # Not OSError alone: torch.save raises RuntimeError and safetensors SafetensorError.
        except Exception as e:
            going_on = self.state != "stopping"
            self.emit(
                ErrorEvent(
                    message=f"could not save {folder}: {durable.cause(e, folder)}",
                    kind="config",
                    advice=durable.WRITE_ADVICE + ("; training goes on" if going_on else ""),
                )
            )
            return None
        if with_optimizer:
            self.checkpoint_bytes = durable.folder_bytes(path)
        if folder.parent.name == "checkpoints":
            keep = {checkpoint.step_dir_name(s) for s in self.autopilot.protected()}
            checkpoint.prune(folder.parent, self.cfg.train.save_total_limit, keep)
        self.emit(CheckpointEvent(step=self.step, path=str(path)))
        return path

    def _warn_low_space(self, folder: Path, optimizer: torch.optim.Optimizer | None) -> None:
        """A warning, once until the space is back, when a checkpoint may not fit twice."""
        needed = self.checkpoint_bytes or checkpoint.estimate_bytes(self.model, optimizer)
        low = durable.low_space(folder, needed)
        if low is not None and not self._low_space_warned:
            self.emit(WarningEvent(message=low, kind="config", advice=durable.WRITE_ADVICE))
        self._low_space_warned = low is not None

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise _Cancelled

    def _finish(self, verdict: str) -> str:
        assert self.run_dir is not None
        if verdict == "cancelled":
            return "cancelled"
        self._set_state("stopping")
        if verdict == "nonfinite":
            return self._end_nonfinite()
        if verdict == "stopped":
            self.save_checkpoint()
        if self.save_checkpoint(self.run_dir / "final", with_optimizer=False) is None:
            return "failed"
        return verdict

    def _end_nonfinite(self) -> str:
        """A run nobody can resume ends at a non-finite loss, with its last finite weights saved."""
        assert self.nonfinite is not None
        loss, norm = self.nonfinite
        path = self.save_checkpoint()
        saved = (
            f"the last finite weights are in {path}" if path else "the last finite weights could not be saved"
        )
        self.emit(
            ErrorEvent(
                message=f"loss {loss} / grad norm {norm} at step {self.step + 1} is not finite; "
                f"the run ends, as nothing can resume it; {saved}",
                kind="nan",
                advice=NAN_STOP_ADVICE,
            )
        )
        return "failed"

    # ------------------------------------------------------------ helpers

    def _set_state(self, state: str) -> None:
        self.state = state
        self.emit(StateEvent(state=state))

    def _release_memory(self) -> None:
        if hasattr(self, "optimizer"):
            self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _require(ok: bool, message: str, advice: str) -> None:
    if not ok:
        raise ConfigError(message, advice)


def _leave_a_core_free() -> None:
    """On the CPU, train on all cores but one unless the user chose a thread count.

    A window's event loop shares the process with the training thread; with every core busy in
    torch's OpenMP pool, a 2-core machine stalls both, and steps get several times slower. Headless
    (the CLI, whose loop only sleeps and prints), every core trains.
    """
    cores = os.cpu_count() or 1
    if cores > 1 and "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() >= cores:
        torch.set_num_threads(cores - 1)
