"""Quick evaluation of pre-trained backbones: correspondence accuracy and a dense linear probe."""
