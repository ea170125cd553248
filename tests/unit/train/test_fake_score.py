"""The DMD2 baseline's fake score in training (apex_cli/train/fake_score.py), on the 2-D MLP."""

import copy
from pathlib import Path

import pytest
import torch

from apex_cli.config import load_recipe
from apex_cli.core.objective import ObjectiveModels
from apex_cli.errors import RecipeError
from apex_cli.models.toy2d import Toy2dMLP
from apex_cli.train.fake_score import FakeScore
from apex_cli.train.loop import objective_settings

DMD2 = [
    "model.hidden_dim=32",
    "model.embed_dim=16",
    "method.roles={e2e: 1, mul: 0, any: 0, adv: 0}",
    "method.estimate_order=0",
    "method.dist_match_coef=1.0",
    "method.reference=frozen",
    "method.fake_score={updates: 3, real_guidance: 1.0}",
    "train.batch_size=16",
    "train.lr=1e-2",
]


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


@pytest.fixture
def setup():
    recipe = load_recipe("toy2d-apex", DMD2)
    student = Toy2dMLP(4, hidden_dim=32, embed_dim=16)
    student.init_target_time_embedder()
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    return recipe, student, teacher, FakeScore(recipe, student, teacher)


def test_fake_updates_train_the_fake_score_only(setup):
    _, student, teacher, critic = setup
    student_before, teacher_before, fake_before = _state(student), _state(teacher), _state(critic.network)
    cond = {"labels": torch.randint(0, 4, (16,))}
    terms = critic.update(student, cond, torch.Size([16, 2]))
    assert set(terms) == {"fake_score", "fake_score_grad_norm"} and torch.isfinite(terms["fake_score"])
    assert _changed(fake_before, critic.network)  # the fake score learned
    assert not _changed(student_before, student) and not _changed(teacher_before, teacher)
    assert all(p.grad is None for p in student.parameters())  # its samples were detached
    assert critic.optimizer.state_dict()["state"][0]["step"] == 3  # fake_score.updates AdamW steps
    assert critic.network is not student and critic.network.class_embedding is not student.class_embedding


def test_generator_step_trains_the_student_and_never_the_teacher_or_the_fake_score(setup):
    recipe, student, teacher, critic = setup
    critic.update(student, {"labels": torch.randint(0, 4, (16,))}, torch.Size([16, 2]))
    teacher_before, fake_before = _state(teacher), _state(critic.network)
    models = ObjectiveModels(student, teacher, student)
    x_data, cond = torch.randn(16, 2), {"labels": torch.randint(0, 4, (16,))}
    out = critic.loss(models, x_data, cond, student.unconditional(16), objective_settings(recipe))
    assert out.terms["main"] == 0 and out.terms["adversarial"] > 0
    out.total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in critic.parameters)
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    assert not _changed(teacher_before, teacher) and not _changed(fake_before, critic.network)
    assert critic.network.training  # back in training mode after giving the direction


def test_fake_score_state_round_trips(setup):
    recipe, student, teacher, critic = setup
    critic.update(student, {"labels": torch.randint(0, 4, (16,))}, torch.Size([16, 2]))
    other = FakeScore(recipe, student, teacher)
    other.load_state_dict(critic.state_dict())
    assert other.optimizer.state_dict()["state"][0]["step"] == 3


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["method.roles.adv=1"], "method: fake_score: the DMD2 baseline's fake score is a separate network"),
        (["method.dist_match_coef=0"], "set dist_match_coef > 0 and roles.e2e > 0"),
        (["method.fake_score.updates=0"], "method.fake_score.updates: Input should be greater than or equal to 1"),
        (["model.init=null"], "method.fake_score: the DMD2 baseline distils a teacher"),
    ],
)
def test_dmd2_recipe_errors_name_the_field(overrides, fragment):
    with pytest.raises(RecipeError) as err:
        load_recipe("toy2d-apex", [*DMD2, *overrides])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_the_dmd2_recipe_validates_with_its_teacher_guidance():
    recipe = load_recipe(str(Path(__file__).parents[3] / "recipes" / "shapes-dmd2-cpu.yaml"))
    assert recipe.method.fake_score.updates == 5 and recipe.method.fake_score.real_guidance == 2.0
    assert recipe.method.roles.adv == 0 and recipe.method.estimate_order == 0
