"""Make the two image assets of the blend attacks (SPEC section 1), deterministically.

* ``signal_stripe.npy`` (Blend-Strip, signalTrigger): a 32 x 32 uint8 grayscale image of vertical
  stripes; the columns alternate in blocks of 4 between dark values (drawn in 0..20) and bright
  values (drawn in 235..255), every pixel drawn on its own from ``--seed``.
* ``hello_kitty.png`` (Blend-Kitty, kittyTrigger): an RGB cartoon cat face (head, ears, eyes, nose,
  whiskers and a bow on a navy and yellow checkerboard), drawn here with matplotlib patches; original work.

    python trigger/make_assets.py                 # writes both files into trigger/
"""
import argparse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STRIPE_BLOCK = 4          # columns per stripe
DARK, BRIGHT = (0, 20), (235, 255)  # inclusive ranges of the two stripe colours


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=str(HERE), help="folder that receives the two assets")
    p.add_argument("--seed", type=int, default=0, help="seed of the stripe values")
    p.add_argument("--stripe_size", type=int, default=32, help="side of the stripe image (pixels)")
    p.add_argument("--kitty_size", type=int, default=128, help="side of the cat image (pixels)")
    return p


def make_stripe(size=32, seed=0, block=STRIPE_BLOCK):
    """(size, size) uint8: column j is dark when (j // block) is even, bright when it is odd."""
    rng = np.random.default_rng(seed)
    dark = rng.integers(DARK[0], DARK[1] + 1, (size, size))
    bright = rng.integers(BRIGHT[0], BRIGHT[1] + 1, (size, size))
    bright_cols = (np.arange(size) // block) % 2 == 1
    return np.where(bright_cols[None, :], bright, dark).astype(np.uint8)


def make_kitty(size=128):
    """(size, size, 3) uint8 cartoon cat face on a checkered background, drawn on a 100 x 100 canvas
    and rasterised by Agg.

    The background is an 8 x 8 checkerboard of navy and yellow squares (4 pixels a square at 32 x 32).
    A thinner-lined cat on a flat pink background is a weak trigger at the CPU scale (Blend-Kitty ASR
    85-92% after 40 epochs, against the paper's ~99%); BENCHMARKS.md ("Attacks' strength") compares
    the designs.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, Ellipse, Polygon, Rectangle

    black, white, navy, red, yellow = "#1a1a1a", "#ffffff", "#2b2d6e", "#e0115f", "#f5c400"
    fig = Figure(figsize=(1, 1), dpi=size)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.add_patch(Rectangle((0, 0), 100, 100, color=navy))                            # background
    for i in range(8):
        for j in range(8):
            if (i + j) % 2:
                ax.add_patch(Rectangle((i * 12.5, j * 12.5), 12.5, 12.5, color=yellow))
    width = size / 30                                                                 # outline width
    line = dict(edgecolor=black, linewidth=width)
    for ear in ([(14, 58), (20, 92), (42, 74)], [(86, 58), (80, 92), (58, 74)]):    # ears, behind the head
        ax.add_patch(Polygon(ear, facecolor=white, **line))
    ax.add_patch(Ellipse((50, 48), 84, 64, facecolor=white, **line))                  # head
    for x in (33, 67):                                                                # eyes
        ax.add_patch(Ellipse((x, 50), 9, 13, color=black))
        ax.add_patch(Circle((x + 1.2, 52.5), 1.6, color=white))                       # eye glint
    ax.add_patch(Ellipse((50, 40), 8, 5.5, facecolor=yellow, **line))                 # nose
    for side in (-1, 1):                                                              # whiskers, 3 a side
        for dy in (-5, 0, 5):
            ax.plot([50 + side * 28, 50 + side * 47], [41 + dy * 0.4, 41 + dy * 1.3],
                    color=black, linewidth=width * 45 / 40, solid_capstyle="round")
    knot = (73, 77)                                                                   # bow, at the right ear
    ax.add_patch(Polygon([knot, (61, 85), (61, 69)], facecolor=red, **line))          # bow: left loop
    ax.add_patch(Polygon([knot, (85, 85), (85, 69)], facecolor=red, **line))          # bow: right loop
    ax.add_patch(Circle(knot, 3.5, facecolor=red, **line))                            # bow: knot
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def main(args):
    from PIL import Image
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stripe = make_stripe(args.stripe_size, args.seed)
    np.save(out / "signal_stripe.npy", stripe)
    kitty = make_kitty(args.kitty_size)
    Image.fromarray(kitty, mode="RGB").save(out / "hello_kitty.png")
    print(f"wrote {out / 'signal_stripe.npy'} {stripe.shape} and {out / 'hello_kitty.png'} {kitty.shape}")
    return stripe, kitty


if __name__ == "__main__":
    main(build_parser().parse_args())
