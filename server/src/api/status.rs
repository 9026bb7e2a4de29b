//! Domain errors as gRPC statuses: the one place that chooses a code for
//! each, so every API answers the same failure the same way.

use tonic::{Code, Status};

use crate::ca::IssueError;
use crate::issuance::{IssuanceError, Refusal};

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
        match e {
            // The store and the journal choose their own codes (an
            // unreachable database or audit log is Unavailable: retry).
            IssuanceError::Store(s) => Status::from(s),
            IssuanceError::NotRecorded(j) => Status::from(j),
            IssuanceError::BatchSize { .. } => Status::invalid_argument(e.to_string()),
            IssuanceError::Invalid(ref i) => Status::new(issue_code(i), e.to_string()),
        }
    }
}
