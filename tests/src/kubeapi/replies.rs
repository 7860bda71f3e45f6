//! Replies

use super::Resource;
use axum::http::Method;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::StatusDetails;
use serde_json::Value;

/// What a handler answers: a status code and a JSON (or plain text) body.
#[derive(Debug)]
pub(super) struct Reply {
    pub(super) code: u16,
    pub(super) body: Value,
}

impl Reply {
    pub(super) fn ok(body: Value) -> Self {
        Self { code: 200, body }
    }

    pub(super) fn created(body: Value) -> Self {
        Self { code: 201, body }
    }

    /// A failure `Status`, built from k8s-openapi's type so its shape is the
    /// real one (`kind`, `apiVersion`, `metadata`, `status`, `message`,
    /// `reason`, `details`, `code`).
    pub(super) fn status(
        code: u16,
        reason: &str,
        message: String,
        details: Option<StatusDetails>,
    ) -> Self {
        let status = Status {
            code: Some(i32::from(code)),
            details,
            message: Some(message),
            metadata: ListMeta::default(),
            reason: Some(reason.to_string()),
            status: Some("Failure".into()),
        };
        Self {
            code,
            body: serde_json::to_value(status).unwrap_or(Value::Null),
        }
    }

    pub(super) fn not_found(res: &Resource, name: &str) -> Self {
        Self::status(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", res.plural),
            Some(details(res, name)),
        )
    }

    pub(super) fn bad_request(message: String) -> Self {
        Self::status(400, "BadRequest", message, None)
    }

    pub(super) fn invalid(res: &Resource, name: &str, message: String) -> Self {
        Self::status(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {message}", res.kind),
            Some(details(res, name)),
        )
    }

    pub(super) fn conflict(res: &Resource, name: &str, message: &str) -> Self {
        Self::status(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {message}",
                res.plural
            ),
            Some(details(res, name)),
        )
    }

    pub(super) fn method_not_allowed(method: &Method) -> Self {
        Self::status(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
            None,
        )
    }
}

pub(super) fn details(res: &Resource, name: &str) -> StatusDetails {
    StatusDetails {
        name: Some(name.to_string()),
        kind: Some(res.plural.to_string()),
        group: (!res.group.is_empty()).then(|| res.group.to_string()),
        ..StatusDetails::default()
    }
}

pub(super) fn success_status(
    res: &Resource,
    name: &str,
    uid: Option<String>,
    code: Option<i32>,
) -> Value {
    let status = Status {
        code,
        details: Some(StatusDetails {
            uid,
            ..details(res, name)
        }),
        message: None,
        metadata: ListMeta::default(),
        reason: None,
        status: Some("Success".into()),
    };
    serde_json::to_value(status).unwrap_or(Value::Null)
}
