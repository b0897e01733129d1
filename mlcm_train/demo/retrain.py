"""``--retrain-teacher``: re-create a shipped demo teacher and its classifier from their recipes (minutes to hours on 2 CPU cores)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from mlcm_train.demo.classifier_train import ClassifierRecipe, save_classifier, train_classifier
from mlcm_train.demo.teacher_train import RECIPE_FILE, TeacherRecipe, train_teacher
from mlcm_train.eval.digits import CONFIG_FILE

log = logging.getLogger(__name__)


def retrain_assets(folder: str | Path, dataset: str | None = None) -> Path:
    """Train both with the recipes stored in ``folder`` (or the defaults) and replace the folder's contents.

    ``dataset`` picks the captioned set when ``folder`` holds no recipe yet (default: digits); with a recipe it
    must agree with it.
    """
    folder = Path(folder)
    teacher_recipe, classifier_recipe = TeacherRecipe(), ClassifierRecipe()
    if (folder / RECIPE_FILE).is_file():
        teacher_recipe = TeacherRecipe.from_dict(
            json.loads((folder / RECIPE_FILE).read_text(encoding="utf-8"))
        )
    if (folder / CONFIG_FILE).is_file():
        values = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        classifier_recipe = ClassifierRecipe(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        )
    if dataset is not None:
        for recipe in (teacher_recipe, classifier_recipe):
            if (folder / RECIPE_FILE).is_file() and recipe.dataset != dataset:
                raise ValueError(
                    f"{folder} holds a {recipe.dataset} recipe but dataset={dataset!r} was asked; "
                    "retrain into an empty folder, or drop the dataset"
                )
        if not (folder / RECIPE_FILE).is_file():
            teacher_recipe = TeacherRecipe.for_dataset(dataset)
        classifier_recipe = dataclasses.replace(classifier_recipe, dataset=dataset)
    staging = folder.parent / (folder.name + ".new")
    log.info("retraining the demo teacher into %s (recipe %s)", staging, teacher_recipe.to_dict())
    train_teacher(staging, teacher_recipe, work_dir=folder.parent / (folder.name + ".work"))
    save_classifier(train_classifier(classifier_recipe), staging, classifier_recipe)
    if (folder / "README.md").is_file():  # the folder's description outlives its weights
        shutil.copy2(folder / "README.md", staging / "README.md")
    if folder.exists():
        shutil.rmtree(folder)
    staging.replace(folder)
    return folder
