"""Stage 1: item features, the modal-specific GNN, the residual-VQ quantizer, training, evaluation, export."""
