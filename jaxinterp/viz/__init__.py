"""Pictures: matplotlib plots of circuits, faithfulness curves and heatmaps (`plots`), and the
self-contained HTML circuit viewer (`viewer`, with its JavaScript in `assets/`)."""
