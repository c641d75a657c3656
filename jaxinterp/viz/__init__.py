"""Pictures: matplotlib plots of circuits, faithfulness curves and heatmaps (`plots`), the
self-contained HTML circuit viewer (`viewer`, with its JavaScript in `assets/`), and the viewer's
page for a graph file (`page.write_page`, experiments/view.py's pipeline)."""
