"""``--retrain-teacher``: re-create the shipped teacher and classifier from their recipes (hours on 2 CPU cores)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from mlcm_train.demo.classifier_train import ClassifierRecipe, save_classifier, train_classifier
from mlcm_train.demo.teacher_train import RECIPE_FILE, TeacherRecipe, train_teacher
from mlcm_train.eval.digits import CONFIG_FILE

log = logging.getLogger(__name__)


def retrain_assets(folder: str | Path) -> Path:
    """Train both with the recipes stored in ``folder`` (or the defaults) and replace the folder's contents."""
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
    staging = folder.parent / (folder.name + ".new")
    log.info("retraining the demo teacher into %s (recipe %s)", staging, teacher_recipe.to_dict())
    train_teacher(staging, teacher_recipe, work_dir=folder.parent / (folder.name + ".work"))
    save_classifier(train_classifier(classifier_recipe), staging, classifier_recipe)
    if folder.exists():
        shutil.rmtree(folder)
    staging.replace(folder)
    return folder
