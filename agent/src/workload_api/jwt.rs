//! FetchJWTSVID, FetchJWTBundles and ValidateJWTSVID, with the limits on
//! the audiences a request may name.

use meshid_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{Encoded, WorkloadApi};

/// At most this many audiences in one FetchJWTSVID request.
pub const MAX_AUDIENCES: usize = 32;
/// At most this many bytes in one audience value.
pub const MAX_AUDIENCE_BYTES: usize = 512;
/// At most this many bytes in all audience values of one request.
pub const MAX_AUDIENCE_TOTAL_BYTES: usize = 4096;

/// The request's audience, checked against the limits, sorted and deduped
/// (the cache key).
fn checked_audience(audience: &[String]) -> Result<Vec<String>, Status> {
    if audience.is_empty() || audience.iter().any(String::is_empty) {
        return Err(Status::invalid_argument("audience must be specified"));
    }
    if audience.len() > MAX_AUDIENCES {
        return Err(Status::invalid_argument(format!(
            "too many audiences: {} (at most {MAX_AUDIENCES})",
            audience.len()
        )));
    }
    if audience.iter().any(|a| a.len() > MAX_AUDIENCE_BYTES) {
        return Err(Status::invalid_argument(format!(
            "an audience is longer than {MAX_AUDIENCE_BYTES} bytes"
        )));
    }
    if audience.iter().map(String::len).sum::<usize>() > MAX_AUDIENCE_TOTAL_BYTES {
        return Err(Status::invalid_argument(format!(
            "audiences are longer than {MAX_AUDIENCE_TOTAL_BYTES} bytes in total"
        )));
    }
    let mut aud = audience.to_vec();
    aud.sort();
    aud.dedup();
    Ok(aud)
}

impl WorkloadApi {
    pub(super) async fn fetch_jwt_inner(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<JwtsvidResponse, Status> {
        let (sel, _) = self.authenticate(&req).await?;
        let r = req.into_inner();
        let aud = checked_audience(&r.audience)?;
        let snap = self.agent.snapshot.borrow().clone();
        let mut entries = self.entitled(&snap, &sel);
        if !r.spiffe_id.is_empty() {
            entries.retain(|e| e.spiffe_id == r.spiffe_id);
        }
        if entries.is_empty() {
            return Err(Status::permission_denied(
                "no identity issued to this caller",
            ));
        }
        let svids = self
            .jwt_svids
            .fetch(&snap, &entries, &r.audience, &aud, |e, p| {
                self.drops.note(e, "invalid_svid", p);
            })
            .await?;
        if svids.is_empty() {
            return Err(Status::unavailable("the server issued no JWT-SVID"));
        }
        Ok(JwtsvidResponse { svids })
    }

    pub(super) async fn fetch_jwt_bundles_stream(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<ReceiverStream<Result<JwtBundlesResponse, Status>>>, Status> {
        let r = self.authenticate(&req).await;
        self.count(
            "FetchJWTBundles",
            &r.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        let sel = r?;
        Ok(Response::new(self.stream(sel, |snap, served, _| {
            let bundles = Self::bundle_map(snap, &served.entries(snap), crate::jwt::jwks);
            Ok(snap
                .bundle
                .as_ref()
                .map(|_| Encoded::new(JwtBundlesResponse { bundles })))
        })))
    }

    pub(super) async fn validate_jwtsvid_inner(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let sel = self.authenticate(&req).await;
        let res = (|| {
            let (sel, _) = sel?;
            let r = req.get_ref();
            if r.audience.is_empty() {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            if r.audience.len() > MAX_AUDIENCE_BYTES {
                return Err(Status::invalid_argument(format!(
                    "audience is longer than {MAX_AUDIENCE_BYTES} bytes"
                )));
            }
            if r.svid.is_empty() {
                return Err(Status::invalid_argument("svid must be specified"));
            }
            let snap = self.agent.snapshot.borrow().clone();
            let entries = self.entitled(&snap, &sel);
            let bundles = Self::bundles_for(&snap, &entries);
            let (sub, claims) =
                crate::jwt::validate(&r.svid, &r.audience, bundles, self.agent.clock.now())
                    .map_err(|e| {
                        // The token itself is never logged.
                        tracing::info!(error = %e, "JWT-SVID validation refused");
                        Status::invalid_argument(e.to_string())
                    })?;
            let claims = match crate::jwt::to_prost(&claims).kind {
                Some(prost_types::value::Kind::StructValue(s)) => Some(s),
                _ => None,
            };
            Ok(ValidateJwtsvidResponse {
                spiffe_id: sub,
                claims,
            })
        })();
        self.count(
            "ValidateJWTSVID",
            &res.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        res.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audience_limits() {
        assert_eq!(
            checked_audience(&["b".into(), "a".into(), "b".into()]).expect("ok"),
            ["a", "b"]
        );
        for bad in [
            vec![],
            vec![String::new()],
            vec!["x".repeat(MAX_AUDIENCE_BYTES + 1)],
            (0..=MAX_AUDIENCES).map(|i| i.to_string()).collect(),
            (0..10).map(|i| format!("{i}{}", "x".repeat(500))).collect(),
        ] {
            let e = checked_audience(&bad).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
        }
    }
}
