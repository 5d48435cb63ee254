"""Anti-distillation sampling end to end over real HTTP (issue 17): a student distilled from a defended
server's answers is worse on the owner's protect set than one distilled from the same server undefended,
by a margin the measurement justifies; the teacher's own cost in the same setting is reported beside it.

Real parts throughout: uvicorn servers on 127.0.0.1 (tilt on, tilt off), `potstill generate --teacher URL`
as the distiller's client, `potstill train` (ce) of a student from the same initial weights in both arms,
real forward passes for every NLL. The setting (tiny models, a strong lambda, where the effect is real and
measured) is tests/antidistill_fixtures.py; it is not the real-scale goal of issue 17, which
`potstill study antidistill` measures on the embedded teacher (README, Studies).
"""

from __future__ import annotations

import pytest

from potstill.studies.antidistill_http import teacher_protect_cost
from tests.antidistill_fixtures import RECIPE, build_setting, run_arm, serving
from tests.guard_fixtures import one_torch_thread

pytestmark = pytest.mark.slow  # 21-26 s on the shared 2-core CPU (two servers, two captures, two trainings)

LAMBDA = 3.0
SEED = 0
MARGIN = 0.25  # nats of protect NLL: the measured one-seed 97.5 % prediction bound (test docstring)
MAX_TEACHER_COST = 2.0  # nats: the teacher's measured cost at LAMBDA is 1.29 (teacher-forced, deterministic)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    with one_torch_thread():
        yield build_setting(tmp_path_factory.mktemp("antidistill-e2e"))


def test_defended_outputs_teach_the_protect_set_worse(setting, record_property):
    """The defended student's protect NLL exceeds the undefended one's by >= MARGIN nats (seed SEED).

    Measured (`python -m tests.antidistill_fixtures --seeds 10 --lambdas 1 3 10 --temperature-baseline`, this
    setting, AMD EPYC Zen 3 AVX2, OMP_NUM_THREADS=1, ~3 s per arm): at lambda 3, defended - undefended student
    protect NLL over seeds 0-9 (paired) = +0.423 nats, 95 % t-interval [+0.371, +0.474], sd 0.072, n = 10,
    10/10 positive (per seed +0.424 +0.364 +0.414 +0.486 +0.415 +0.465 +0.502 +0.269 +0.385 +0.502). MARGIN is
    the one-seed 97.5 % t-prediction bound mean - t(9) * sd * sqrt(1 + 1/10) = +0.251, rounded down: a seed
    drawn anew would fail it with ~2.5 % chance; seed 0 measured +0.424. The teacher's side of the trade-off:
    its protect NLL under the distribution served at lambda 3 is 1.348 nats vs 0.059 clean (cost +1.29).
    Against anti-distillation off on the "defended" server (LAMBDA = 0) the two captures are the same and the
    test fails (gap +0.000).
    """
    with one_torch_thread():
        with serving(setting, LAMBDA) as url:
            defended = run_arm(setting, url, SEED, setting.root / "defended")
        with serving(setting, 0.0) as url:
            undefended = run_arm(setting, url, SEED, setting.root / "undefended")
        teacher = teacher_protect_cost(setting.teacher, setting.antidistill(LAMBDA), setting.protect)
    gap = defended["protect_nll"] - undefended["protect_nll"]
    line = (f"lambda {LAMBDA:g}, seed {SEED}: student protect NLL {defended['protect_nll']:.3f} (defended) vs "
            f"{undefended['protect_nll']:.3f} (undefended), gap {gap:+.3f} nats (margin {MARGIN}); teacher protect "
            f"NLL {teacher['served']:.3f} vs {teacher['clean']:.3f} clean: cost {teacher['cost']:+.3f} nats")
    print(line)
    record_property("antidistill_tradeoff", line)
    rows = defended["rows"]  # the captures came over HTTP, one row per (prompt, sample)
    assert rows == undefended["rows"] >= 10 * RECIPE["samples"]
    assert min(defended["completion_tokens"], undefended["completion_tokens"]) > rows
    assert gap >= MARGIN, line
    assert 0 < teacher["cost"] <= MAX_TEACHER_COST, line  # the trade-off: the defence costs the teacher this much
