"""The two shipped demo teachers: each names its captioned set, tokenizes its captions word by word, and
re-creates from its recipe (here at a few steps) with the README kept."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mlcm_train.data import captioned
from mlcm_train.demo.classifier_train import ClassifierRecipe
from mlcm_train.demo.retrain import retrain_assets
from mlcm_train.demo.teacher_train import RECIPE_FILE, TeacherRecipe
from mlcm_train.eval.digits import CONFIG_FILE, DEMO_TEACHERS, load_classifier
from mlcm_train.models.teacher import load_teacher


@pytest.mark.parametrize("name", sorted(DEMO_TEACHERS))
def test_a_shipped_teacher_names_its_set_and_reads_its_captions_word_by_word(name):
    folder = DEMO_TEACHERS[name]
    recipe = TeacherRecipe.from_dict(json.loads((folder / RECIPE_FILE).read_text()))
    assert recipe == TeacherRecipe.for_dataset(name)  # the shipped weights are what the recipe makes
    assert load_classifier(folder).dataset is captioned.get(name)
    teacher = load_teacher(folder)
    captions = captioned.get(name).all_captions()
    ids = teacher.tokenizers[0](captions, padding="max_length", max_length=16).input_ids
    eos = teacher.tokenizers[0].eos_token_id
    assert all(len([i for i in row if i != eos]) == len(text.split()) + 1 for row, text in zip(ids, captions))


def test_retraining_a_shapes_teacher_from_its_recipe_keeps_the_readme(tmp_path):
    folder = tmp_path / "shapes_teacher"
    folder.mkdir()
    tiny = dataclasses.replace(
        TeacherRecipe.for_dataset("shapes"), vae_steps=2, unet_steps=2, warmup_steps=1, checkpoint_every=1
    )
    (folder / RECIPE_FILE).write_text(json.dumps(tiny.to_dict()))
    classifier = dataclasses.replace(ClassifierRecipe(dataset="shapes"), steps=2)
    (folder / CONFIG_FILE).write_text(json.dumps(classifier.to_dict()))
    (folder / "README.md").write_text("kept\n")
    retrain_assets(folder, "shapes")
    assert (folder / "README.md").read_text() == "kept\n"
    assert load_classifier(folder).dataset.name == "shapes"
    assert load_teacher(folder).unet.config.sample_size == 8
    with pytest.raises(ValueError, match="holds a shapes recipe"):
        retrain_assets(folder, "digits")


@pytest.mark.parametrize("name", sorted(DEMO_TEACHERS))
def test_the_demo_bench_prompts_every_caption_and_its_grid_shows_every_class(name):
    from mlcm_train.demo.run import DemoSettings, _Bench

    dataset = captioned.get(name)
    captions = dataset.all_captions()
    bench = _Bench(DemoSettings(teacher=DEMO_TEACHERS[name], samples=2 * len(captions)))
    assert bench.prompts == captions * 2
    shown = [dataset.parse_caption(bench.prompts[i]) for i in bench.grid_index]
    classes = len(dataset.class_words)
    assert [label for label, _ in shown] == [d % classes for d in range(10)]
    assert [colour for _, colour in shown] == [d % len(dataset.colours) for d in range(10)]
    assert len(set(bench.grid_index)) == 10  # columns past the classes take another image of the caption
