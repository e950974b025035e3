"""The demos `aiaas up` makes, without the stack: the classifier's held-out set and eval spec, and
the generative demo's builder (deterministic, cached, a checkpoint the artifact gate takes that
transformers loads and that generates). tests/cli/test_up.py checks them inside a running `up`.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from aiaas import artifact_gate
from aiaas.demo import (
    DEMO_EVAL_SPEC,
    DEMO_LABEL,
    DEMO_TEST_ROWS,
    demo_projection,
    demo_test_set,
    train_demo,
    write_demo_eval,
)
from aiaas.demo_lm import BuildStopped, LMRecipe, build_demo_lm, cached_demo_lm
from aiaas.eval.spec import load_spec
from aiaas.lm import load_causal_lm

# Enough steps to learn something, few enough for a test (about 3 s per build on 2 busy cores).
STEPS = 25


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_held_out_set_is_reproducible_labeled_by_the_task_and_the_demo_is_right_on_it(tmp_path: Path) -> None:
    first = write_demo_eval(tmp_path / "a")
    second = write_demo_eval(tmp_path / "b")
    assert first.dataset.read_bytes() == second.dataset.read_bytes()  # the registry's copy keeps matching

    with np.load(first.dataset, allow_pickle=False) as data:
        columns = {name: data[name] for name in data.files}
    assert set(columns) == {"INPUT0", DEMO_LABEL, "difficulty", "margin"}
    x, y = columns["INPUT0"], columns[DEMO_LABEL]
    assert x.shape == (DEMO_TEST_ROWS, 10) and x.dtype == np.float32 and y.dtype == np.int64
    # Labels are the task's (argmax of the fixed projections), recomputed here independently.
    np.testing.assert_array_equal(y, (x @ demo_projection().numpy()).argmax(axis=1))
    assert set(np.unique(columns["difficulty"])) == {"hard", "medium", "easy"}
    assert np.all(columns["margin"][columns["difficulty"] == "hard"] < 0.75)
    assert len(np.unique(y)) == 10

    # Accuracy on it means something: far above chance (10%), and lower where classes are close.
    module = train_demo().module
    with torch.no_grad():
        predicted = module(torch.from_numpy(x)).argmax(dim=1).numpy()
    right = predicted == y
    assert right.mean() > 0.9
    assert right[columns["difficulty"] == "hard"].mean() < right[columns["difficulty"] == "easy"].mean()
    # None of the held-out rows is a training row (training draws from the seed's own generator).
    assert not np.array_equal(x, demo_test_set(seed=1)["INPUT0"])


def test_eval_spec_is_valid_and_kept_when_edited(tmp_path: Path) -> None:
    files = write_demo_eval(tmp_path)
    spec = load_spec(files.spec)
    assert spec.name == "holdout" and spec.label == DEMO_LABEL
    assert yaml.safe_load(DEMO_EVAL_SPEC)["slices"] == ["overall", {"feature": "difficulty"}]
    files.spec.write_text(DEMO_EVAL_SPEC.replace("min: 0.9", "min: 0.95"))
    write_demo_eval(tmp_path)
    assert "min: 0.95" in files.spec.read_text()


def test_lm_builder_is_deterministic_and_its_checkpoint_passes_the_gate_loads_and_generates(tmp_path: Path) -> None:
    recipe = LMRecipe(steps=STEPS)
    one = build_demo_lm(tmp_path / "one", recipe)
    two = build_demo_lm(tmp_path / "two", recipe)
    assert _digests(one.directory) == _digests(two.directory)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(
        _digests(one.directory))
    assert one.steps == STEPS and one.final_loss < math.log(recipe.vocab_size) - 0.5  # it learned something
    assert 300_000 < one.parameters < 5_000_000

    report = artifact_gate.check_artifact(one.directory, "hf_causal_lm")
    assert report is not None
    lm = load_causal_lm(one.directory)
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in lm.model.parameters()) == one.parameters
    prompt = lm.tokenizer("The registry", return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**prompt, max_new_tokens=12, do_sample=False)
    again = load_causal_lm(two.directory).model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, again)
    text = lm.tokenizer.decode(out[0], skip_special_tokens=True)
    assert text.startswith("The registry") and len(text) > len("The registry")
    # The chat door needs a template: the tokenizer carries one.
    chat = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                            add_generation_prompt=True)
    assert chat == "user: hi\nassistant:"


def test_lm_cache_is_reused_and_an_interrupted_build_leaves_nothing(tmp_path: Path) -> None:
    recipe = LMRecipe(steps=3)
    with pytest.raises(BuildStopped):
        cached_demo_lm(tmp_path, recipe, should_stop=lambda: True)
    assert list(tmp_path.iterdir()) == []

    built = cached_demo_lm(tmp_path, recipe)
    assert not built.cached and built.steps == 3
    digests = _digests(built.directory)
    again = cached_demo_lm(tmp_path, recipe, should_stop=lambda: True)  # would stop any training
    assert again.cached and again.directory == built.directory and _digests(again.directory) == digests
    assert (again.parameters, again.steps) == (built.parameters, built.steps)
    # Another recipe is another checkpoint, beside the first.
    other = cached_demo_lm(tmp_path, LMRecipe(steps=4))
    assert other.directory != built.directory and not other.cached
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(
        [built.directory.name, other.directory.name])
