"""Bundle conventions: the metadata schema, the shared config vocabulary and the checks every bundle under
``bundles/`` passes."""

from .validate import (
    MASK_FORMATS,
    README_SECTIONS,
    REQUIRED_FILES,
    TORCHSCRIPT_OPT_OUT,
    check_bundle_layout,
    check_workflow_properties,
    export_torchscript,
    fake_network_inputs,
    find_bundles,
    load_metadata_schema,
    torchscript_exclusion,
    validate_metadata,
    verify_network_io,
)
from .vocabulary import RETIRED, VOCABULARY, check_vocabulary, config_ids
