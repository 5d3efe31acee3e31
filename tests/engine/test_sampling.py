"""Generation: greedy and seeded sampling, the training RNG left alone, a prompt too long for the
model refused, a stop between tokens, and the trained model kept for sampling after its run."""

from __future__ import annotations

import pytest
import torch

from tests.engine.helpers import make_cfg, of, run
from tunedeck.engine.errors import ConfigError
from tunedeck.engine.protocol import SamplingOptions
from tunedeck.engine.sampling import Sampler, generate
from tunedeck.engine.session import TrainingSession


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    events, trainer = run(make_cfg(tmp_path_factory.mktemp("run"), train__max_steps=3))
    assert events[-1].status == "completed"
    return trainer


def test_seeded_sampling_repeats_and_leaves_the_global_rng_alone(trained):
    sampler = trained.sampler()
    rng = torch.get_rng_state()
    hot = SamplingOptions(max_new_tokens=24, temperature=1.5, seed=7)
    first, again = sampler.generate("Upper: cat\n", hot), sampler.generate("Upper: cat\n", hot)
    other = sampler.generate("Upper: cat\n", SamplingOptions(max_new_tokens=24, temperature=1.5, seed=8))
    assert first == again and first != other
    assert torch.equal(torch.get_rng_state(), rng)
    greedy = sampler.generate("Upper: cat\n", SamplingOptions(max_new_tokens=24))
    assert greedy == sampler.generate("Upper: cat\n", SamplingOptions(max_new_tokens=24, seed=3))


def test_a_prompt_longer_than_the_context_is_refused(trained):
    with pytest.raises(ConfigError) as e:
        trained.sampler().generate("x" * 3000, SamplingOptions(max_new_tokens=64))
    assert e.value.one_line() == (
        "the sample prompt is 3,000 tokens; with max_new_tokens=64 it exceeds the model's context of "
        "2,048 tokens (shorten the prompt or lower max_new_tokens)"
    )


def test_generation_asks_to_stop_between_tokens(trained):
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) >= 3

    generate(
        trained.model, trained.tokenizer, "text", "ab", SamplingOptions(max_new_tokens=50), should_stop=stop
    )
    assert len(calls) == 3


def test_bad_options_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^sample top_p=1.5 is out of range$"):
        SamplingOptions(top_p=1.5).check()


def test_the_session_keeps_its_model_and_final_loads_to_the_same_text(tmp_path):
    session = TrainingSession(make_cfg(tmp_path, train__max_steps=3), system_interval=0)
    assert session.sampler() is None
    session.start()
    assert session.join(120)
    assert session.end is not None and session.end.status == "completed"
    kept = session.sampler()
    assert kept is not None
    opts = SamplingOptions(max_new_tokens=16)
    text = kept.generate("Upper: owl\n", opts)
    loaded = Sampler.from_folder(session.end.output)
    assert loaded.data_format == kept.data_format == "prompt_completion"
    assert loaded.generate("Upper: owl\n", opts) == text and text


def test_a_run_records_its_data_format_for_later_sampling(tmp_path):
    events, t = run(make_cfg(tmp_path, train__max_steps=2))
    import json

    state = json.loads((t.run_dir / "final" / "trainer_state.json").read_text())
    assert state["data_format"] == of(events, "start")[0].data["format"]
