"""Draw the schedule pictures of specs/schedule.md: one per layout, causal, P = 4, N = 32, tiles of 4 x 4;
and one of a causal sliding window over packed documents, where the ring stops early.

    .venv/bin/python specs/schedule_pictures.py          (needs matplotlib: pip install 'ringattn[plot]')

Each is what ``ringattn trace --seq 32 --ranks 4 --block-q 4 --block-k 4 --layout L --png FILE`` draws.
"""

from pathlib import Path

from refimpl import plot
from refimpl.layouts import LAYOUTS, layout_for
from refimpl.masks import mask_for

HERE = Path(__file__).resolve().parent
N, P, BLOCK = 32, 4, 4

if __name__ == "__main__":
    for name in LAYOUTS:
        path = HERE / f"schedule-{name}.png"
        plot.draw(layout_for(name, N, P), mask_for(True), BLOCK, BLOCK, path,
                  title=f"{name}: causal, N={N}, P={P}, tiles {BLOCK}x{BLOCK}")
        print(f"wrote {path}")
    path = HERE / "schedule-window-documents.png"
    plot.draw(layout_for("contiguous", N, P), mask_for(True, (5, -1), cu_seqlens=[0, 12, N], N=N), BLOCK, BLOCK, path,
              title=f"contiguous: causal, window (5, -1), documents [0, 12, {N}]; the ring stops after 2 steps")
    print(f"wrote {path}")
