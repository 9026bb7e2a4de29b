//! The AdmissionReview v1 envelope (`admission.k8s.io/v1`). k8s-openapi does
//! not carry these types; only the fields the webhook uses are modelled, and
//! the pod inside is k8s-openapi's `Pod`.

use serde::{Deserialize, Serialize};

/// `AdmissionReview`, as the API server sends it and as we answer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    /// `admission.k8s.io/v1`.
    pub api_version: String,
    /// `AdmissionReview`.
    pub kind: String,
    /// The request (in a review sent to us).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<AdmissionRequest>,
    /// The response (in our answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<AdmissionResponse>,
}

/// The part of `AdmissionRequest` the webhook reads.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    /// Echoed in the response.
    pub uid: String,
    /// `CREATE`, `UPDATE`, `DELETE` or `CONNECT`.
    pub operation: String,
    /// Namespace of the object.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The object as submitted.
    #[serde(default)]
    pub object: Option<serde_json::Value>,
}

/// `AdmissionResponse`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    /// The request's uid.
    pub uid: String,
    /// Whether the object is admitted.
    pub allowed: bool,
    /// Why not, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ResponseStatus>,
    /// `JSONPatch` when `patch` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<String>,
    /// Base64 of the RFC 6902 JSON Patch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// Shown to the user by kubectl.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// `metav1.Status`, reduced to what a refusal needs.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ResponseStatus {
    /// HTTP-like code.
    pub code: u16,
    /// Message shown to the user.
    pub message: String,
}

impl AdmissionReview {
    /// The answer envelope for `response`.
    pub fn answer(response: AdmissionResponse) -> Self {
        Self {
            api_version: "admission.k8s.io/v1".into(),
            kind: "AdmissionReview".into(),
            request: None,
            response: Some(response),
        }
    }
}
