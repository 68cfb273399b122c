"""Stage 1: item encoders, the modal-specific GNN, the residual-VQ quantizer, training, evaluation, export."""
