"""The teaching material stays true: ``specs/walkthrough.md`` shows what the examples print, and the examples
compute attention.

The walkthrough shows the output of ``examples/tiny_ring.py`` in ```text blocks and quotes its numbers in
the prose, and shows ``examples/ring_in_40_lines.py`` in a ```python block. If the code or the page changes
without the other, these tests fail. The 40-line ring and the exercises' reference answers are held to the
float64 oracle like every other implementation.
"""

import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_fp64_close
from refimpl import cli, naive_attention, naive_attention_backward
from refimpl.layouts import Contiguous

ROOT = Path(__file__).resolve().parent.parent
WALKTHROUGH = (ROOT / "specs" / "walkthrough.md").read_text()
NUMBER = re.compile(r"(?<![\w.])-?\d+\.\d{3}(?![\w.])")     # the examples print three decimals


def load(relative):
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(f"walkthrough_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fenced(text, info):
    """The bodies of the fenced code blocks of ``text`` whose info string is ``info``."""
    return re.findall(rf"^```{info}\n(.*?)\n```$", text, re.M | re.S)


@pytest.fixture(scope="module")
def tiny():
    """(what examples/tiny_ring.py prints, what its main() returns)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = load("examples/tiny_ring.py").main()
    return printed.getvalue(), results


@pytest.fixture(scope="module")
def forty():
    return load("examples/ring_in_40_lines.py")


# -- the worked example -------------------------------------------------------------------------------

def test_tiny_ring_is_the_oracle(tiny):
    _, results = tiny
    for name, (ring, oracle) in results.items():
        assert_fp64_close(ring, oracle, name)


def test_every_output_block_of_the_walkthrough_is_printed(tiny):
    printed, _ = tiny
    blocks = fenced(WALKTHROUGH, "text")
    assert len(blocks) == 9                                   # inputs, grid, 2 ranks, tiles, result, 2 hops, result
    lines = printed.splitlines()
    for block in blocks:
        want = block.splitlines()
        starts = [i for i, line in enumerate(lines) if line == want[0]]
        assert any(lines[i:i + len(want)] == want for i in starts), f"not what tiny_ring.py prints:\n{block}"


def test_every_number_in_the_walkthrough_prose_is_printed(tiny):
    printed, _ = tiny
    prose = re.sub(r"^```.*?^```$", "", WALKTHROUGH, flags=re.M | re.S)
    quoted = NUMBER.findall(prose)
    assert {"-0.534", "1.221", "1.381", "2.480"} <= set(quoted)      # the review's hand computation, section 3
    missing = sorted(set(quoted) - set(NUMBER.findall(printed)))
    assert not missing, f"numbers in specs/walkthrough.md that tiny_ring.py does not print: {missing}"


def test_the_review_hand_computation(tiny):
    """Rank 1's lse from kv1, then from kv0, and their logaddexp: the numbers of issue 8, as printed."""
    printed, _ = tiny
    rank1 = printed.split("forward, rank 1")[1].split("inside rank 1")[0]
    step0, step1 = rank1.split("step 1:")
    # a row: position, partial lse, partial o (2), merged lse, w_run, w_new, merged o (2)
    rows = lambda text: [NUMBER.findall(line) for line in text.splitlines() if re.match(r"\s+[4-7]\s", line)]
    assert [r[0] for r in rows(step0)] == ["-0.534", "0.705", "1.823", "2.026"]
    assert [r[0] for r in rows(step1)] == ["1.221", "1.521", "1.921", "1.472"]
    merged = [float(r[3]) for r in rows(step1)]
    assert np.allclose(merged, np.logaddexp([-0.534, 0.705, 1.823, 2.026], [1.221, 1.521, 1.921, 1.472]),
                       atol=1.5e-3)
    assert merged == [1.381, 1.887, 2.566, 2.48]


# -- the algorithm in 40 lines ------------------------------------------------------------------------

def test_the_40_lines_in_the_walkthrough_are_the_file(forty):
    source = (ROOT / "examples" / "ring_in_40_lines.py").read_text()
    algorithm = source[source.index("import numpy as np"):source.index("\n\n\nif __name__")]
    assert algorithm in fenced(WALKTHROUGH, "python")
    code = [line for line in algorithm.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(code) <= 40, len(code)


def run_40_lines(forty, x, positions, causal):
    """The 40-line ring on q, k, v, dout (1, N, 1, D) cut by ``positions``; results in natural order."""
    q, k, v, dout = ([a[0, p, 0] for p in positions] for a in x)
    out, lse = forty.ring_forward(q, k, v, positions, causal)
    grads = forty.ring_backward(q, k, v, out, lse, dout, positions, causal)
    order = np.concatenate(positions)

    def natural(per_rank):
        y = np.empty_like(np.concatenate(per_rank))
        y[order] = np.concatenate(per_rank)
        return y

    return [natural(a) for a in (out, lse, *grads)]


@pytest.mark.parametrize("N,P,causal", [(8, 2, True), (11, 3, True), (11, 3, False), (7, 1, True),
                                        (13, 4, False), (5, 5, True)])
def test_ring_in_40_lines_is_the_oracle(rng, forty, N, P, causal):
    x = [rng.standard_normal((1, N, 1, 3)) for _ in range(4)]
    layout = Contiguous(N, P)
    got = run_40_lines(forty, x, [layout.positions(r) for r in range(P)], causal)
    out, lse = naive_attention(*x[:3], causal=causal)
    want = [out[0, :, 0], lse[0, 0], *(g[0, :, 0] for g in naive_attention_backward(*x, causal=causal))]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert_fp64_close(a, b, name)


# -- the exercises' checking scripts ------------------------------------------------------------------

def test_zigzag_reference_passes_its_check_and_balances(capsys):
    zigzag = load("examples/exercises/zigzag.py")
    zigzag.check(zigzag.Zigzag)
    printed = capsys.readouterr().out
    assert "P = 4: contiguous 1.75, zigzag 1.00" in printed


def test_zigzag_check_rejects_a_wrong_answer():
    zigzag = load("examples/exercises/zigzag.py")

    class EqualChunksOnly(zigzag.Zigzag):             # drops the N % 2P leftover tokens
        def positions(self, rank):
            m = self.chunks.N // (2 * self.P)
            return np.concatenate([np.arange(rank * m, (rank + 1) * m),
                                   np.arange((2 * self.P - 1 - rank) * m, (2 * self.P - rank) * m)])

    with pytest.raises(AssertionError, match="N=3, P=1, rank 0"):
        zigzag.check(EqualChunksOnly)


def test_merge_order_exercise_measures_rounding_not_errors(capsys):
    stats = load("examples/exercises/merge_order.py").main()
    assert stats["commutative"]                        # bitwise, as algorithm.md section 3 says
    assert 0 < stats["o_differ"] < 1                   # the two groupings differ somewhere...
    assert stats["o_ulps"] <= 8 and stats["lse_ulps"] <= 2     # ...by rounding only


# -- the cluster example ------------------------------------------------------------------------------

def test_the_sbatch_example_runs_a_valid_command():
    """examples/slurm.sbatch: the options it passes to `ringattn run` parse, and every process starts with a
    BLAS pool of its --cpus-per-task (srun binds each rank to them; refimpl/threads.py then uses them all)."""
    script = (ROOT / "examples" / "slurm.sbatch").read_text().replace("\\\n", " ")
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    words = shlex.split(srun.split(">")[0].replace("$SLURM_JOB_ID", "1"))
    args = cli.parser().parse_args(words[words.index("ringattn") + 1:])
    assert (args.command, args.seq, args.backward, args.check, args.output) == ("run", 2 ** 20, True, True, "out/1")
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        assert f"export {variable}=$SLURM_CPUS_PER_TASK" in script
