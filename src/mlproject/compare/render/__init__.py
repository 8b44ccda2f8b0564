"""Rendering primitives for compare, knowing nothing of any view: the block model views
produce and how numbers print in it (``blocks``), its Markdown (``markdown``) and HTML
(``html``) writers, and matplotlib helpers for the PNG plots (``figures``).

Markdown is plain GitHub-flavoured tables (it renders on GitHub and in MLflow's artifact
viewer, and reads fine in a terminal): medals 🥇🥈🥉, worst value 🔻, better / worse than
the baseline 🟢 / 🔴, direction ▲ / ▼. HTML carries the same blocks with colours
(#1ABD76 green, #E33D30 red, as in the hand-made tables) and the plots embedded, so the single
file works as an MLflow artifact. Plots use matplotlib's object API on an Agg canvas (no
pyplot state, no display needed). Which blocks make a compare report, in which order:
``mlproject.compare.document``.

Precision: scores (acc, pass@1, avg_acc …) 4 decimals; PPL, times, sizes, percentages 2;
versus shows scores as percentages (2 decimals), deltas in points, relative change 1 decimal.
Missing values print as N/A.
"""
