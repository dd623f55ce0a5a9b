"""A boot's timeline as a picture (SVG, no script, no external file): one bar per step,
from the step before it to the step itself, labelled with its name and seconds. Used inline
by ``--hil-report``'s page and as allure's attachment."""

from __future__ import annotations

from hil.record import Boot, markup

WIDTH = 720
LABEL = 170  # the names' column
ROW = 22
TOP = 28
COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#e15759")


def render(boot: Boot, title: str = "") -> str:
    """The SVG document of ``boot``'s steps (escaped: names come from the console's text)."""
    total = max(boot.seconds, 0.001)
    scale = (WIDTH - LABEL - 150) / total
    height = TOP + ROW * max(1, len(boot.steps)) + 24
    head = title or f"boot after {boot.origin}: {boot.seconds:.1f} s"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="boot-timeline" width="{WIDTH}" '
           f'height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" '
           'font-size="12">',
           f"<title>{markup(head)}</title>",
           f'<text x="4" y="16" font-weight="bold">{markup(head)}</text>']
    for i, step in enumerate(boot.steps):
        y = TOP + i * ROW
        x = LABEL + (step.at - step.took) * scale
        w = max(1.0, step.took * scale)
        out.append(f'<g class="boot-step" data-step="{markup(step.name)}">'
                   f'<text x="4" y="{y + 14}">{markup(step.name)}</text>'
                   f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{ROW - 6}" '
                   f'fill="{COLOURS[i % len(COLOURS)]}"/>'
                   f'<text x="{x + w + 4:.1f}" y="{y + 14}">{step.took:.2f} s '
                   f'(at {step.at:.2f} s)</text></g>')
    axis = TOP + ROW * max(1, len(boot.steps)) + 4
    out.append(f'<line x1="{LABEL}" y1="{axis}" x2="{LABEL + total * scale:.1f}" y2="{axis}" '
               'stroke="#666"/>')
    out.append(f'<text x="{LABEL}" y="{axis + 14}" fill="#666">0 s</text>'
               f'<text x="{LABEL + total * scale:.1f}" y="{axis + 14}" fill="#666" '
               f'text-anchor="end">{total:.1f} s</text>')
    out.append("</svg>")
    return "".join(out)
