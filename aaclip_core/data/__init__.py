"""Dataset indexing, validation, the synthetic demo dataset, and the torch dataset."""

from aaclip_core.data.dataset import (
    AUGMENT_MODES,
    AnomalyDataset,
    build_augmentation,
    load_image_tensor,
)
from aaclip_core.data.layouts import (
    IMAGE_EXTENSIONS,
    LAYOUTS,
    detect_layout,
    index_dataset,
    write_metadata_jsonl,
)
from aaclip_core.data.samples import (
    Sample,
    class_names_of,
    select_classes,
    sort_samples,
    validate_samples,
)
from aaclip_core.data.splits import k_shot, train_val_split
from aaclip_core.data.synthetic import (
    DEFECTS,
    DEMO_CLASSES,
    ensure_demo_data,
    render_sample,
    write_synthetic_dataset,
)

__all__ = [
    "AUGMENT_MODES",
    "DEFECTS",
    "DEMO_CLASSES",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "AnomalyDataset",
    "Sample",
    "build_augmentation",
    "class_names_of",
    "detect_layout",
    "ensure_demo_data",
    "index_dataset",
    "k_shot",
    "load_image_tensor",
    "render_sample",
    "select_classes",
    "sort_samples",
    "train_val_split",
    "validate_samples",
    "write_metadata_jsonl",
    "write_synthetic_dataset",
]
