//! Domain errors as gRPC statuses: the one place that chooses a code for
//! each, so every API answers the same failure the same way.

use tonic::{Code, Status};

use crate::ca::IssueError;
use crate::issuance::{IssuanceError, Refusal};
use crate::store::StoreError;

/// The code for a certificate that could not be signed.
pub fn issue_code(e: &IssueError) -> Code {
    match e {
        IssueError::MalformedCsr(_)
        | IssueError::BadCsrSignature
        | IssueError::UnsupportedKey(_)
        | IssueError::InvalidDnsName(_)
        | IssueError::InvalidSpiffeId(_) => Code::InvalidArgument,
        IssueError::CaExpired => Code::Unavailable,
        IssueError::Sign(_) => Code::Internal,
    }
}

/// The code for one refused request of a batch.
pub fn refusal_code(r: &Refusal) -> Code {
    match r {
        Refusal::NoEntry(_) => Code::NotFound,
        Refusal::NotParented(_) => Code::PermissionDenied,
        Refusal::NoAudience => Code::InvalidArgument,
        Refusal::Invalid(e) => issue_code(e),
        Refusal::Signing(_) => Code::Internal,
    }
}

impl From<IssuanceError> for Status {
    fn from(e: IssuanceError) -> Self {
        let code = match &e {
            IssuanceError::BatchSize { .. } => Code::InvalidArgument,
            IssuanceError::Invalid(i) => issue_code(i),
            IssuanceError::Store(StoreError::Db(_)) | IssuanceError::NotRecorded(_) => {
                Code::Unavailable
            }
            IssuanceError::Store(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
