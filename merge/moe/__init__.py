"""MoE assembly (mergekit-moe syntax): router gate vectors and output formats."""
