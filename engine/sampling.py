"""Generating text with the model as it is: during a run (the ``sample`` command), after it (the
trained model kept in memory), or from a saved adapter folder.

A prompt is laid out as the training data laid out its prompts (``data.prompt_ids``). Greedy by
default; with a temperature above 0 it samples (top-p, top-k, a seed). Generation never draws from
the training RNG: it runs inside ``torch.random.fork_rng``, so sampling mid-run changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tunedeck.engine import data
from tunedeck.engine.errors import ConfigError
from tunedeck.engine.protocol import SamplingOptions

__all__ = ["Sampler", "SamplingOptions", "context_length", "generate"]


def context_length(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _StopFlag:
    """A transformers stopping criterion that asks ``should_stop`` between tokens."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device
        )


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    data_format: str,
    prompt: str,
    options: SamplingOptions,
    *,
    compute: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    should_stop: Callable[[], bool] | None = None,
) -> str:
    """The model's continuation of ``prompt``; the model's train/eval mode is left as it was."""
    options.check()
    ids = data.prompt_ids(tokenizer, data_format, prompt)
    if not ids:
        raise ConfigError("the sample prompt is empty", "type a prompt to continue")
    limit = context_length(model)
    if limit is not None and len(ids) + options.max_new_tokens > limit:
        raise ConfigError(
            f"the sample prompt is {len(ids):,} tokens; with max_new_tokens={options.max_new_tokens} it "
            f"exceeds the model's context of {limit:,} tokens",
            "shorten the prompt or lower max_new_tokens",
        )
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    kwargs: dict[str, Any] = {"do_sample": False}
    if options.temperature > 0:
        kwargs = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p}
        kwargs["top_k"] = options.top_k
    if should_stop is not None:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopFlag(should_stop)])
    was_training = model.training
    model.eval()
    try:
        with _own_rng(device, options.seed), compute(), torch.no_grad():
            out = model.generate(  # type: ignore[operator]
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=options.max_new_tokens,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                **kwargs,
            )
    finally:
        model.train(was_training)
    return str(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


@contextlib.contextmanager
def _own_rng(device: torch.device, seed: int | None) -> Iterator[None]:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        yield


class Sampler:
    """A model kept for generation: the trained model after its run, or one loaded from a folder."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        data_format: str,
        compute: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.model, self.tokenizer, self.data_format, self._compute = model, tokenizer, data_format, compute
        self._lock = threading.Lock()  # one generation at a time: they share the model

    @classmethod
    def from_folder(cls, folder: str | Path) -> Sampler:
        """A run's ``final/`` or a checkpoint folder: its base model (from its ``config.yaml``) with
        its adapter, or its full weights for a full fine-tune."""
        from tunedeck.engine import checkpoint
        from tunedeck.engine import model as model_mod

        folder = Path(folder)
        cfg = checkpoint.read_config(folder)
        state_file = folder / checkpoint.STATE_FILE
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        fmt = state.get("data_format") or (cfg.data.format if cfg.data.format != "auto" else "text")
        model: torch.nn.Module
        if (folder / "adapter_config.json").is_file():
            from peft import PeftModel

            base = model_mod.load_base(cfg)
            model = PeftModel.from_pretrained(base.model, str(folder))
        else:
            full = cfg.copy()
            full.model.name_or_path = str(folder)
            base = model_mod.load_base(full)
            model = base.model
        model.eval()
        return cls(model, base.tokenizer, fmt)

    def generate(
        self, prompt: str, options: SamplingOptions, should_stop: Callable[[], bool] | None = None
    ) -> str:
        with self._lock:
            return generate(
                self.model,
                self.tokenizer,
                self.data_format,
                prompt,
                options,
                compute=self._compute,
                should_stop=should_stop,
            )
