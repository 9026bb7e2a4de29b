//! Domain errors as gRPC statuses: the one place that chooses a code for
//! each, so every API answers the same failure the same way.

use tonic::{Code, Status};

use meshid_identity::kube::KubeError;

use crate::attest::join_token::TokenError;
use crate::attest::k8s_psat::PsatError;
use crate::ca::IssueError;
use crate::issuance::{IssuanceError, Refusal};
use crate::journal::JournalError;
use crate::state::AgentAuthError;
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
        match e {
            // The store and the journal choose their own codes (an
            // unreachable database or audit log is Unavailable: retry).
            IssuanceError::Store(s) => Status::from(s),
            IssuanceError::NotRecorded(j) => Status::from(j),
            IssuanceError::Signing(crate::signing_pool::PoolError::Panicked) => {
                Status::internal(e.to_string())
            }
            IssuanceError::Signing(_) => Status::unavailable(e.to_string()),
            IssuanceError::BatchSize { .. } => Status::invalid_argument(e.to_string()),
            IssuanceError::Invalid(ref i) => Status::new(issue_code(i), e.to_string()),
        }
    }
}

impl From<StoreError> for Status {
    /// `NotFound`, `AlreadyExists`, `Conflict` (aborted: retry),
    /// `Banned` (permission denied), an unreachable database `Unavailable`
    /// (retry later), anything else `Internal`.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => Self::not_found(m),
            StoreError::AlreadyExists(m) => Self::already_exists(m),
            StoreError::Conflict(m) => Self::aborted(m),
            StoreError::Banned(m) => Self::permission_denied(format!("{m} is banned")),
            e if e.is_unavailable() => Self::unavailable(format!("store unavailable: {e}")),
            e => Self::internal(e.to_string()),
        }
    }
}

impl From<JournalError> for Status {
    fn from(e: JournalError) -> Self {
        match &e {
            JournalError::Store {
                unavailable: false, ..
            } => Self::internal(e.to_string()),
            _ => Self::unavailable(e.to_string()),
        }
    }
}

impl From<TokenError> for Status {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Store(_) => Status::internal(e.to_string()),
            _ => Status::permission_denied(e.to_string()),
        }
    }
}

impl From<PsatError> for Status {
    fn from(e: PsatError) -> Self {
        let msg = e.public_message();
        match &e {
            PsatError::BadPayload(_) => Status::invalid_argument(msg),
            PsatError::Api(KubeError::Unavailable { .. }) | PsatError::Busy(_) => {
                Status::unavailable(msg)
            }
            PsatError::Api(_) => Status::internal(msg),
            _ => Status::permission_denied(msg),
        }
    }
}

impl From<AgentAuthError> for Status {
    /// A certificate that cannot be read is `Unauthenticated`; an unknown,
    /// banned or superseded agent `PermissionDenied`; the store as always.
    fn from(e: AgentAuthError) -> Self {
        match e {
            AgentAuthError::Store(s) => Status::from(s),
            AgentAuthError::BadCertificate(_) => Status::unauthenticated(e.to_string()),
            _ => Status::permission_denied(e.to_string()),
        }
    }
}
