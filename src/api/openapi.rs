//! The OpenAPI 3 description of the whole API, generated from the handlers and types
//! (`utoipa`), served at `GET /openapi.json`.

use axum::Json;
use utoipa::OpenApi;

use crate::model::Tag;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "oci-tag-proxy",
        description = "Which tags does a container image have, what does each point to, and \
            when was it updated? Answers come from a cache refreshed in the background."
    ),
    paths(
        super::tags::get_tags,
        super::tags::get_latest,
        super::health::metrics,
        super::health::healthz,
        super::health::readyz,
        openapi_json,
    ),
    components(schemas(Tag))
)]
pub struct ApiDoc;

/// This document.
#[utoipa::path(get, path = "/openapi.json",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
