"""The training loop: setup, train, evaluate, save, cleanup; live commands at step boundaries.

A straight loop rather than transformers' Trainer: Trainer fixes gradient accumulation per epoch
and its schedulers overwrite live LR changes. The data is a stream of micro-batches (epochs end
to end, each shuffled with ``seed + epoch``); an optimizer step takes the next
``gradient_accumulation_steps`` of them, and the loss is normalised by the target tokens of the
whole window, so batch 2 x accumulation 4 equals batch 8 x accumulation 1. The loss and gradient
norm are read from the device once per optimizer step, together.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tunedeck.engine import attention, checkpoint, data, liger, optim, packing, precision
from tunedeck.engine import model as model_mod
from tunedeck.engine.config import LIVE_KEYS, Config, validate_value
from tunedeck.engine.errors import ConfigError, TunedeckError
from tunedeck.engine.monitor import step_memory
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
    Pause,
    Resume,
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


@dataclass
class Position:
    """Where the micro-batch stream stands; enough to resume exactly."""

    micro: int = 0  # micro-batches consumed since the start of the run
    total_micro: int = 0  # micro-batches the run plans to consume (recounted on accumulation changes)


class Trainer:
    def __init__(
        self,
        cfg: Config | None,
        emit: Callable[[Event], None],
        commands: queue.Queue,
        resume_from: str | Path | None = None,
        on_run_dir: Callable[[Path], None] | None = None,
    ) -> None:
        """``cfg`` None with ``resume_from``: the checkpoint's own (effective) config."""
        if cfg is None and resume_from is None:
            raise ValueError("a Trainer needs a config or a checkpoint to resume from")
        self.cfg = cfg
        self.emit = emit
        self.commands = commands
        self.resume_from = Path(resume_from) if resume_from else None
        self.on_run_dir = on_run_dir
        self.step = 0
        self.state = "loading"
        self.change_log: list[dict[str, Any]] = []
        self.run_dir: Path | None = None
        self.elapsed_before = 0.0
        self.step_time_ema = 0.0

    # ------------------------------------------------------------ lifecycle

    def run(self) -> EndEvent:
        """Everything from loading to the end event; user mistakes become error events, never exceptions."""
        status = "failed"
        try:
            self._set_state("loading")
            self.setup()
            status = self.train()
        except TunedeckError as e:
            self.emit(ErrorEvent(message=e.message, kind=e.kind, advice=e.advice))
        except torch.OutOfMemoryError:
            self._release_memory()
            self.emit(
                ErrorEvent(message=f"out of memory at step {self.step + 1}", kind="oom", advice=OOM_ADVICE)
            )
        output = None
        if status in ("completed", "stopped") and self.run_dir is not None:
            output = str(self.run_dir / "final")
        self._set_state("finished")
        return EndEvent(status=status, step=self.step, output=output)

    def setup(self) -> None:
        resume_state: dict[str, Any] | None = None
        if self.resume_from is not None:
            saved_cfg, resume_state = checkpoint.read_state(self.resume_from)
            self.cfg = self.cfg or saved_cfg
        cfg, t = self.cfg, self.cfg.train
        optim.check_available(t.optim)
        torch.manual_seed(t.seed)
        self.loaded = model_mod.load(cfg)
        if self.loaded.device.type == "cpu":
            _leave_a_core_free()
        self.model, self.tokenizer, self.device = self.loaded.model, self.loaded.tokenizer, self.loaded.device
        self.varlen = attention.enable_varlen(self.model, cfg.data.packing, self.device, self.loaded.dtype)
        self.compiled: str | None = None
        splits = data.load_examples(cfg.data, self.tokenizer, t.seed, data.tokenizing_progress(self.emit))
        self.train_examples, self.eval_examples = splits.train, splits.eval
        self.data_format = splits.format
        if splits.dropped:
            self.emit(
                WarningEvent(
                    message=f"{splits.dropped} examples had no answer token left within "
                    f"data.max_length={cfg.data.max_length} and were dropped",
                    kind="data",
                    advice="raise data.max_length to keep them",
                )
            )
        self.per_epoch = math.ceil(len(self.train_examples) / t.per_device_train_batch_size)
        self.ga = t.gradient_accumulation_steps
        if t.max_steps > 0:
            total_steps = t.max_steps
            total_micro = t.max_steps * self.ga
        else:
            total_micro = math.ceil(t.num_train_epochs * self.per_epoch)
            total_steps = math.ceil(total_micro / self.ga)
        self.pos = Position(micro=0, total_micro=total_micro)
        self.total_steps = total_steps
        params = list(self.model.named_parameters())
        self.trainable = [p for _, p in params if p.requires_grad]
        self.optim_name = t.optim
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
        if resume_state is not None:
            self._restore(resume_state)
        if t.torch_compile:
            self._compile()
        self._open_run_dir()
        self.emit(
            StartEvent(
                run_id=self.run_dir.name,
                config=cfg.to_dict(),
                model={
                    **self.loaded.info(),
                    "compiled": self.compiled,
                    "attention": f"{attention.VARLEN} ({self.varlen})"
                    if self.varlen
                    else cfg.model.attn_implementation,
                    "optimizer": optim.actual_name(t.optim, self.device),
                },
                data={
                    "train_examples": len(self.train_examples),
                    "eval_examples": len(self.eval_examples),
                    "format": splits.format,
                    "dropped": splits.dropped,
                },
                total_steps=self.total_steps,
                run_dir=str(self.run_dir),
                resumed_from=str(self.resume_from) if self.resume_from else None,
                changes=list(self.change_log),
                step=self.step,
            )
        )

    @contextlib.contextmanager
    def _compute(self) -> Iterator[None]:
        """Around every forward pass of the model: bf16 autocast and Liger's RoPE where they apply."""
        with (
            precision.autocast(self.device, self.loaded.dtype, self.model),
            liger.fused_rope(self.loaded.liger_rope),
        ):
            yield

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
        from tunedeck.engine import config as config_mod

        if self.resume_from is not None and self.resume_from.parent.name == "checkpoints":
            self.run_dir = self.resume_from.parent.parent
        else:
            root = Path(self.cfg.train.output_dir)
            name = self.cfg.train.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir, n = root / name, 1
            while run_dir.exists():
                n += 1
                run_dir = root / f"{name}-{n}"
            self.run_dir = run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_mod.save(self.cfg, self.run_dir / "config.yaml")
        if self.on_run_dir is not None:
            self.on_run_dir(self.run_dir)

    # ------------------------------------------------------------ the loop

    def train(self) -> str:
        t = self.cfg.train
        self._set_state("running")
        self.model.train()
        self.t0 = time.perf_counter()
        self.start_step = self.step
        while self.step < self.total_steps:
            verdict = self._boundary()
            if verdict is not None:
                return self._finish(verdict)
            began = time.perf_counter()
            loss, grad_norm, tokens = self._optimizer_step()
            if loss is None:
                continue  # non-finite: the run was paused, nothing was updated
            # The loss read inside the step synchronised the device, so this is the step's true time.
            step_time = time.perf_counter() - began
            self.step_time_ema = (
                step_time if self.step == self.start_step + 1 else 0.9 * self.step_time_ema + 0.1 * step_time
            )
            if self.step % t.logging_steps == 0 or self.step == self.total_steps:
                self._emit_step(loss, grad_norm, tokens, step_time)
            if t.eval_steps and self.step % t.eval_steps == 0 and self.eval_examples:
                self.evaluate()
            if t.save_steps and self.step % t.save_steps == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        # Commands that arrived during the last step still get their answer.
        return self._finish(self._boundary() or "completed")

    def _next_micro_batches(self) -> list[list[dict]]:
        """The examples of each micro-batch of the next optimizer step."""
        b = self.cfg.train.per_device_train_batch_size
        n = min(self.ga, self.pos.total_micro - self.pos.micro) or self.ga
        out = []
        for _ in range(n):
            epoch, i = divmod(self.pos.micro, self.per_epoch)
            order = self._order(epoch)
            out.append([self.train_examples[j] for j in order[i * b : (i + 1) * b]])
            self.pos.micro += 1
        return out

    def _order(self, epoch: int) -> list[int]:
        if getattr(self, "_order_epoch", None) != epoch:
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

    def _optimizer_step(self) -> tuple[float | None, float | None, int]:
        t = self.cfg.train
        pad = self.tokenizer.pad_token_id
        batches = [
            packing.prepare_batch(data.collate(mb, pad, packing=self.cfg.data.packing), self.varlen)
            for mb in self._next_micro_batches()
        ]
        # Counted on the host before the copy, so normalising costs no device sync.
        n_targets = max(1, sum(data.count_targets(b) for b in batches))
        tokens = sum(
            int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
            for b in batches
        )
        loss_sum = torch.zeros((), device=self.device)
        for b in batches:
            with self._compute():
                out = self.model(**self._to_device(b), num_items_in_batch=n_targets)
            out.loss.backward()
            loss_sum += out.loss.detach()
        clip = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        loss, norm = torch.stack([loss_sum.float(), grad_norm.float().to(loss_sum.device)]).tolist()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
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
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_lr = lr
        self.schedule.advance()
        self.step += 1
        return loss, norm, tokens

    def _emit_step(self, loss: float, grad_norm: float | None, tokens: int, step_time: float) -> None:
        elapsed = self.elapsed_before + time.perf_counter() - self.t0
        self.emit(
            StepEvent(
                step=self.step,
                epoch=self.pos.micro / self.per_epoch,
                loss=loss,
                learning_rate=self.last_lr,
                grad_norm=grad_norm,
                gradient_accumulation_steps=self.ga,
                tokens=tokens,
                tokens_per_s=tokens / step_time if step_time > 0 else 0.0,
                step_time_s=step_time,
                elapsed_s=elapsed,
                eta_s=self.step_time_ema * (self.total_steps - self.step),
                total_steps=self.total_steps,
                **step_memory(self.device),
            )
        )

    # ------------------------------------------------------------ commands

    def _boundary(self) -> str | None:
        """Apply queued commands; block while paused. Returns 'stopped'/'cancelled' to end the loop."""
        while True:
            try:
                cmd = self.commands.get(block=self.state == "paused", timeout=0.1)
            except queue.Empty:
                if self.state == "paused":
                    continue
                return None
            verdict = self._apply(cmd)
            if verdict is not None:
                return verdict

    def _apply(self, cmd: Command) -> str | None:
        try:
            if isinstance(cmd, Stop):
                return "stopped"
            if isinstance(cmd, Cancel):
                return "cancelled"
            if isinstance(cmd, Pause):
                self._require(self.state == "running", "pause: the run is already paused", "send resume")
                self._set_state("paused")
            elif isinstance(cmd, Resume):
                self._require(self.state == "paused", "resume: the run is not paused", "send pause first")
                self._set_state("running")
            elif isinstance(cmd, Set):
                self.apply_set(cmd.values)
            elif isinstance(cmd, Save):
                self.save_checkpoint()
            elif isinstance(cmd, Eval):
                self._require(
                    bool(self.eval_examples),
                    "eval: this run has no eval split",
                    "set data.eval_fraction above 0 for the next run",
                )
                self.evaluate()
            elif isinstance(cmd, Sample):
                self.sample(cmd.prompt, cmd.max_new_tokens)
            else:
                raise ConfigError(f"unknown command {cmd!r}", "see DESIGN.md for commands")
        except TunedeckError as e:
            self.emit(ErrorEvent(message=e.message, kind=e.kind, advice=e.advice))
        return None

    @staticmethod
    def _require(ok: bool, message: str, advice: str) -> None:
        if not ok:
            raise ConfigError(message, advice)

    def apply_set(self, values: dict[str, Any], source: str = "user") -> None:
        """Validate all values first, then apply all: a refused set changes nothing."""
        t = self.cfg.train
        checked: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in LIVE_KEYS:
                raise ConfigError(
                    f"{key} cannot be changed while a run goes", f"live-changeable: {', '.join(LIVE_KEYS)}"
                )
            checked[key] = validate_value("train", key, raw)
        if "optim" in checked:
            optim.check_available(checked["optim"])
        changes = {k: [getattr(t, k), v] for k, v in checked.items() if getattr(t, k) != v}
        if not changes:
            return
        auto: dict[str, list[Any]] = {}
        if "learning_rate" in changes:
            self.schedule.set_base_lr(checked["learning_rate"])
        if "lr_scheduler_type" in changes:
            self.schedule.switch(checked["lr_scheduler_type"], t.lr_scheduler_kwargs)
        if "gradient_accumulation_steps" in changes:
            auto = self._regroup(checked["gradient_accumulation_steps"])
        if "optim" in changes:
            self.optimizer, carried = optim.swap(
                self.optimizer,
                optim.actual_name(self.optim_name, self.device),
                optim.actual_name(checked["optim"], self.device),
                t,
                checked.get("weight_decay", t.weight_decay),
            )
            self.optim_name = checked["optim"]
            if not carried and self.step:
                self.emit(
                    WarningEvent(
                        message=f"{changes['optim'][0]} -> {checked['optim']}: optimizer state "
                        "starts fresh (moments carry over only between fp32 Adam variants)",
                        kind="config",
                        advice="",
                    )
                )
        if "weight_decay" in changes:
            optim.set_weight_decay(self.optimizer, checked["weight_decay"])
        for k, v in checked.items():
            setattr(t, k, v)
        self._record(changes, source)
        if auto:
            self._record(auto, "auto")

    def _regroup(self, new_ga: int) -> dict[str, list[Any]]:
        """Recount the remaining optimizer steps from the remaining micro-batches."""
        remaining_micro = self.pos.total_micro - self.pos.micro
        remaining_steps = max(1, math.ceil(remaining_micro / new_ga))
        old_total = self.total_steps
        self.ga = new_ga
        self.total_steps = self.step + remaining_steps
        self.schedule.respread(remaining_steps)
        return {"total_steps": [old_total, self.total_steps]} if old_total != self.total_steps else {}

    def _record(self, changes: dict[str, list[Any]], source: str) -> None:
        self.change_log.append({"step": self.step, "changes": changes, "source": source})
        self.emit(ChangeEvent(step=self.step, changes=changes, source=source))

    # ------------------------------------------------------------ eval / sample / save

    @torch.no_grad()
    def evaluate(self) -> float:
        was_training = self.model.training
        self.model.eval()
        bs = self.cfg.train.per_device_eval_batch_size
        pad = self.tokenizer.pad_token_id
        batches = [
            packing.prepare_batch(
                data.collate(self.eval_examples[i : i + bs], pad, packing=self.cfg.data.packing), self.varlen
            )
            for i in range(0, len(self.eval_examples), bs)
        ]
        n_targets = max(1, sum(data.count_targets(b) for b in batches))
        total = torch.zeros((), device=self.device)
        for b in batches:
            with self._compute():
                total += self.model(**self._to_device(b), num_items_in_batch=n_targets).loss.float()
        loss = float(total)
        self.model.train(was_training)
        self.emit(EvalEvent(step=self.step, eval_loss=loss, perplexity=math.exp(min(loss, 50.0))))
        return loss

    @torch.no_grad()
    def sample(self, prompt: str, max_new_tokens: int) -> str:
        prompt_ids = data.prompt_ids(self.tokenizer, self.data_format, prompt)
        if not prompt_ids:
            raise ConfigError("the sample prompt is empty", "type a prompt to continue")
        was_training = self.model.training
        self.model.eval()
        ids = torch.tensor([prompt_ids], device=self.device)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        # Generation must not draw from the training RNG, or a sample would change the run.
        with (
            torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []),
            self._compute(),
        ):
            out = self.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        text = self.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        self.model.train(was_training)
        self.emit(SampleEvent(step=self.step, prompt=prompt, text=text))
        return text

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "micro": self.pos.micro,
            "total_micro": self.pos.total_micro,
            "gradient_accumulation_steps": self.ga,
            "optim": self.optim_name,
            "schedule": self.schedule.state_dict(),
            "change_log": self.change_log,
            "elapsed_s": self.elapsed_before + time.perf_counter() - getattr(self, "t0", time.perf_counter()),
            "run_id": self.run_dir.name if self.run_dir else None,
        }

    def save_checkpoint(self, folder: Path | None = None, with_optimizer: bool = True) -> Path | None:
        """Write a checkpoint; a failed write is an error event and the run goes on (None returned)."""
        assert self.run_dir is not None
        folder = folder or self.run_dir / "checkpoints" / checkpoint.step_dir_name(self.step)
        try:
            path = checkpoint.write(
                folder,
                model=self.model,
                tokenizer=self.tokenizer,
                cfg=self.cfg,
                state=self.trainer_state(),
                optimizer=self.optimizer if with_optimizer else None,
            )
        except OSError as e:
            self.emit(
                ErrorEvent(
                    message=f"could not save {folder}: {e.strerror or e}",
                    kind="internal",
                    advice="free disk space or point train.output_dir elsewhere; earlier checkpoints "
                    "are untouched and training goes on",
                )
            )
            return None
        if folder.parent.name == "checkpoints":
            checkpoint.prune(folder.parent, self.cfg.train.save_total_limit)
        self.emit(CheckpointEvent(step=self.step, path=str(path)))
        return path

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.resume_from is not None
        checkpoint.load_weights(self.model, self.resume_from)
        checkpoint.load_optimizer(self.optimizer, self.resume_from)
        self.schedule.load_state_dict(state["schedule"])
        self.step = int(state["step"])
        self.total_steps = int(state["total_steps"])
        self.pos = Position(micro=int(state["micro"]), total_micro=int(state["total_micro"]))
        self.ga = int(state["gradient_accumulation_steps"])
        self.change_log = list(state.get("change_log", []))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.last_lr = self.schedule.last_lr()
        checkpoint.load_rng(self.resume_from)

    def _finish(self, verdict: str) -> str:
        if verdict == "cancelled":
            return "cancelled"
        self._set_state("stopping")
        if verdict == "stopped":
            self.save_checkpoint()
        if self.save_checkpoint(self.run_dir / "final", with_optimizer=False) is None:
            return "failed"
        return verdict

    # ------------------------------------------------------------ helpers

    def _set_state(self, state: str) -> None:
        self.state = state
        self.emit(StateEvent(state=state))

    def _release_memory(self) -> None:
        with contextlib.suppress(Exception):
            self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _leave_a_core_free() -> None:
    """On the CPU, train on all cores but one unless the user chose a thread count.

    The GUI's event loop (or the CLI's) shares the machine with the training thread; with every core
    busy in torch's OpenMP pool, a 2-core machine stalls both, and steps get several times slower.
    """
    cores = os.cpu_count() or 1
    if cores > 1 and "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() >= cores:
        torch.set_num_threads(cores - 1)
