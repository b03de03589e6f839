"""The recipe table (cm/recipes.py): every row is well formed, and cm_train.py's checks read it.

A flag that only other rows use is a one-line UsageError naming it; what
"is a consistency model" means for sampling and the --training_mode choices
are derived from the rows.
"""

import importlib.util
import os

import pytest

from cm import recipes
from cm.cli import UsageError
from cm.recipe_flags import apply_recipe_preset, check_recipe_args, explicit_flags
from cm.sample_util import CONSISTENCY_MODES
from cm.script_util import TRAINING_MODES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def parser():
    spec = importlib.util.spec_from_file_location("cm_train_table", os.path.join(ROOT, "scripts", "cm_train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.create_argparser()


def check(parser, argv):
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    apply_recipe_preset(args, explicit)
    check_recipe_args(args, explicit)
    return args


def test_every_row_is_well_formed(parser):
    dests = {a.dest for a in parser._actions}
    for name, row in recipes.RECIPES.items():
        assert row.name == name and callable(row.loss) and callable(row.schedule)
        assert row.teacher in ("required", "optional", "unused")
        assert row.target in ("ema", "online", "unwrapped", "none")
        assert row.init_from in ("required", "optional", "unused")
        assert {row.train_scalings, row.sample_scalings} <= set(recipes.SCALINGS)
        assert set(row.flags) <= dests and set(row.loss_options) <= dests, name
        assert row.level_name.isidentifier()  # what the loop logs the level as
        fn = row.schedule(parser.parse_args(["--training_mode", name]))
        mu, level = fn(0)
        assert 0.0 <= mu < 1.0 and level >= 0


def test_modes_and_scalings_come_from_the_table():
    assert TRAINING_MODES == ("edm",) + tuple(recipes.RECIPES)
    # the boundary-condition rows sample as consistency models; progdist (and edm) with EDM's scalings
    assert CONSISTENCY_MODES == tuple(m for m, r in recipes.RECIPES.items() if r.sample_scalings == "boundary")
    assert {"consistency_distillation", "consistency_training", "ect", "ict"} <= set(CONSISTENCY_MODES)
    assert not recipes.samples_with_boundary_scalings("progdist")
    assert not recipes.samples_with_boundary_scalings("edm")


@pytest.mark.parametrize("argv, flag", [
    (["--training_mode", "consistency_distillation", "--teacher_model_path", "t.pt", "--huber_c", "0.1"], "--huber_c"),
    (["--training_mode", "ict", "--ect_q", "4"], "--ect_q"),
    (["--training_mode", "ect", "--init_from", "none", "--start_ema", "0.9"], "--start_ema"),
    (["--training_mode", "progdist", "--teacher_model_path", "t.pt", "--init_from", "none"], "--init_from"),
])
def test_a_flag_of_other_rows_is_a_one_line_error(parser, argv, flag):
    with pytest.raises(UsageError, match=f"^{flag} is for --training_mode"):
        check(parser, argv)


def test_teacher_rules_come_from_the_row(parser):
    with pytest.raises(UsageError, match="needs --teacher_model_path"):
        check(parser, ["--training_mode", "progdist"])
    with pytest.raises(UsageError, match="--teacher_model_path is not used by --training_mode ict"):
        check(parser, ["--training_mode", "ict", "--teacher_model_path", "t.pt"])
    check(parser, ["--training_mode", "consistency_training", "--teacher_model_path", "t.pt"])  # initial weights


def test_an_unknown_mode_names_edm_train():
    with pytest.raises(ValueError, match="edm_train.py"):
        recipes.get_recipe("edm")
