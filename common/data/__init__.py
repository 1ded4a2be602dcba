"""Readers, synthetic generators, dataset converters, datalists, the episode sampler, and the report-text,
findings-table and box utilities that converters and engines share."""

from .boxes import fuse_boxes_wbf
from .ct_rate import CT_RATE_WINDOW, REGION_KEYWORDS, assign_region, convert_ct_rate, convert_omniabnorm_cot
from .collate import REPORT_LIST_KEYS, collate_reports
from .datalist import (
    IMAGE_SUFFIXES,
    ReferenceSet,
    list_images,
    load_datalist,
    load_datalists,
    load_references,
    references_from_datalist,
    select_references,
    write_references,
    write_volume_list,
)
from .dicom import DicomReader, dicom_series_files, is_dicom_file, is_dicom_series, read_dicom
from .episodes import EpisodeDataset
from .findings_table import DEFAULT_FINDINGS_TABLE, load_findings_table, mesh_findings, negated, silver_entities
from .mni152 import MNI152_CLASSES, MNI152_SOURCE, build_mni152_task, mni152_label_map
from .openi import convert_openi_reports, openi_reports_tgz, parse_openi_report
from .random_episodes import (
    Appearance,
    MixedEpisodeDataset,
    RandomAnatomy,
    RandomEpisodeDataset,
    random_anatomy,
    random_appearance,
    random_episode,
    render_view,
)
from .report_text import region_texts, report_text_batch, split_sentences
from .reports import REPORT_SUFFIXES, LoadReportd, list_reports, normalize_report_text, read_report_file
from .robust import ERROR_KEY, SKIPPED_KEY, SOURCE_KEY, ErrorTolerantDataset, root_cause
from .synthetic_ct_reports import (
    CT_REGIONS,
    LESION_TYPES,
    LesionType,
    generate_ct_report_case,
    generate_ct_report_dataset,
)
from .synthetic3d import (
    HELDOUT_CLASSES,
    SHAPES,
    SYNTHETIC_CLASSES,
    TEXTURES,
    StructureClass,
    generate_synthetic_3d,
    generate_volume,
    smooth_random_field,
    write_nifti,
)
from .synthetic_cxr import (
    CXR_CONCEPTS,
    CXR_DISEASES,
    DISEASE_RULES,
    FIELD_OF_VIEW_MM,
    LESION_CLASSES,
    DiseaseRule,
    diseases_from_concepts,
    generate_cxr,
    generate_synthetic_cxr,
    load_lung_mask,
    num_lung_masks,
)
from .vindr import (
    VINDR_DETECTION_CLASSES,
    VINDR_GLOBAL_LABELS,
    VINDR_LOCAL_LABELS,
    convert_vindr_classification,
    convert_vindr_detection,
)
from .volume import VOLUME_SUFFIXES, VolumeReader
