"""Contains all the data models used in inputs/outputs"""

from .allocation_rule import AllocationRule
from .allocation_unit import AllocationUnit
from .artifact_file_out import ArtifactFileOut
from .artifact_out import ArtifactOut
from .artifact_out_kind import ArtifactOutKind
from .bit_budget import BitBudget
from .body_upload_dataset import BodyUploadDataset
from .calibration_inputs import CalibrationInputs
from .calibration_row import CalibrationRow
from .dataset_out import DatasetOut
from .dataset_page import DatasetPage
from .error_info import ErrorInfo
from .error_response import ErrorResponse
from .event_out import EventOut
from .event_out_data_type_0 import EventOutDataType0
from .export_format import ExportFormat
from .fleet_out import FleetOut
from .get_job_profile_format import GetJobProfileFormat
from .health_out import HealthOut
from .job_out import JobOut
from .job_out_result_type_0 import JobOutResultType0
from .job_page import JobPage
from .job_spec import JobSpec
from .job_spec_group_size_by_bits import JobSpecGroupSizeByBits
from .job_status import JobStatus
from .layer_out import LayerOut
from .layer_out_quant_error_type_0 import LayerOutQuantErrorType0
from .layer_out_scores import LayerOutScores
from .linear_out import LinearOut
from .linear_out_quant_error import LinearOutQuantError
from .message import Message
from .method import Method
from .model_out import ModelOut
from .profile_out import ProfileOut
from .quantizer import Quantizer
from .ready_out import ReadyOut
from .ready_out_checks import ReadyOutChecks
from .ready_out_status import ReadyOutStatus
from .target_runtime import TargetRuntime
from .worker_class_out import WorkerClassOut
from .worker_out import WorkerOut
from .zero_point import ZeroPoint

__all__ = (
    "AllocationRule",
    "AllocationUnit",
    "ArtifactFileOut",
    "ArtifactOut",
    "ArtifactOutKind",
    "BitBudget",
    "BodyUploadDataset",
    "CalibrationInputs",
    "CalibrationRow",
    "DatasetOut",
    "DatasetPage",
    "ErrorInfo",
    "ErrorResponse",
    "EventOut",
    "EventOutDataType0",
    "ExportFormat",
    "FleetOut",
    "GetJobProfileFormat",
    "HealthOut",
    "JobOut",
    "JobOutResultType0",
    "JobPage",
    "JobSpec",
    "JobSpecGroupSizeByBits",
    "JobStatus",
    "LayerOut",
    "LayerOutQuantErrorType0",
    "LayerOutScores",
    "LinearOut",
    "LinearOutQuantError",
    "Message",
    "Method",
    "ModelOut",
    "ProfileOut",
    "Quantizer",
    "ReadyOut",
    "ReadyOutChecks",
    "ReadyOutStatus",
    "TargetRuntime",
    "WorkerClassOut",
    "WorkerOut",
    "ZeroPoint",
)
