//! The HTTP handlers of `/v1/files` and `/v1/batches`.
//!
//! Every rejection is an OpenAI error body ([`ApiError`]): a malformed multipart body, a bad
//! query, an unknown id, a file over the limit. Without a data directory the routes exist and
//! answer 404 saying how to turn the API on, rather than "no route".

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::objects::Purpose;
use super::service::{BatchService, CreateBatch};
use crate::app::AppState;
use crate::error::ApiError;
use crate::extract::Json;

/// Room for the multipart framing and the `purpose` field around an upload's content.
pub const MULTIPART_OVERHEAD_BYTES: u64 = 64 * 1024;
/// Bytes read from disk per chunk of a file download.
const DOWNLOAD_CHUNK_BYTES: usize = 64 * 1024;
/// Longest accepted text field of an upload (`purpose`).
const FIELD_CHARS_MAX: usize = 64;

/// The routes: uploads may carry `upload_bytes_max` bytes of content, other bodies
/// `body_limit_bytes` (the server's own limit).
pub fn routes(body_limit_bytes: usize, upload_bytes_max: u64) -> Router<AppState> {
    let upload_limit = usize::try_from(upload_bytes_max.saturating_add(MULTIPART_OVERHEAD_BYTES))
        .unwrap_or(usize::MAX);
    Router::new()
        .route(
            "/v1/files",
            post(upload_file)
                .layer(DefaultBodyLimit::max(upload_limit))
                .get(list_files),
        )
        .route("/v1/files/{file_id}", get(file).delete(delete_file))
        .route("/v1/files/{file_id}/content", get(file_content))
        .route("/v1/batches", post(create_batch).get(list_batches))
        .route("/v1/batches/{batch_id}", get(batch))
        .route("/v1/batches/{batch_id}/cancel", post(cancel_batch))
        // Outside the upload's own limit, which therefore wins there.
        .layer(DefaultBodyLimit::max(body_limit_bytes))
}

fn service(state: &AppState) -> Result<Arc<BatchService>, ApiError> {
    state.batches().cloned().ok_or_else(|| ApiError::NotFound {
        message: "the Files and Batch APIs are off: start `candela serve` with \
                  `--data-dir DIR` to store files and batches"
            .to_owned(),
        param: None,
    })
}

fn path_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|e| ApiError::MalformedBody(format!("invalid path: {}", e.body_text())))
}

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::MalformedBody(format!("invalid query: {}", e.body_text())))
}

fn multipart_error(
    bytes_max: u64,
) -> impl Fn(axum::extract::multipart::MultipartError) -> ApiError {
    move |e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::FileTooLarge { bytes_max }
        } else {
            ApiError::MalformedBody(format!("invalid multipart body: {}", e.body_text()))
        }
    }
}

/// `POST /v1/files`: a multipart form with `purpose` (`batch`) and `file`. The content is
/// streamed to disk (never whole in memory), counted against the limit as it comes, then
/// checked as a batch file before it becomes a File.
async fn upload_file(
    State(state): State<AppState>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let service = service(&state)?;
    let bytes_max = service.file_bytes_max();
    // Refused before a byte is read when the client says how much is coming.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > bytes_max.saturating_add(MULTIPART_OVERHEAD_BYTES)) {
        return Err(ApiError::FileTooLarge { bytes_max });
    }
    let mut multipart = multipart.map_err(|e| {
        ApiError::MalformedBody(format!(
            "the body must be multipart/form-data with the fields `purpose` and `file`: {}",
            e.body_text()
        ))
    })?;
    let to_api = multipart_error(bytes_max);
    let mut purpose = None;
    let mut upload = None;
    while let Some(mut field) = multipart.next_field().await.map_err(&to_api)? {
        match field.name() {
            Some("purpose") => {
                let text = field.text().await.map_err(&to_api)?;
                if text.chars().count() > FIELD_CHARS_MAX {
                    return Err(ApiError::invalid("purpose", "`purpose` is too long"));
                }
                purpose = Some(text);
            }
            Some("file") => {
                if upload.is_some() {
                    return Err(ApiError::invalid("file", "give exactly one `file`"));
                }
                let filename = field.file_name().unwrap_or("upload.jsonl").to_owned();
                let target = service.new_upload();
                let mut out = tokio::fs::File::create(target.path())
                    .await
                    .map_err(|e| ApiError::Internal(format!("creating an upload: {e}")))?;
                let mut written = 0u64;
                while let Some(chunk) = field.chunk().await.map_err(&to_api)? {
                    written += chunk.len() as u64;
                    if written > bytes_max {
                        return Err(ApiError::FileTooLarge { bytes_max });
                    }
                    out.write_all(&chunk)
                        .await
                        .map_err(|e| ApiError::Internal(format!("writing an upload: {e}")))?;
                }
                out.flush()
                    .await
                    .map_err(|e| ApiError::Internal(format!("writing an upload: {e}")))?;
                upload = Some((target, filename));
            }
            Some(other) => return Err(ApiError::UnsupportedParam(other.to_owned())),
            None => {
                return Err(ApiError::MalformedBody(
                    "every multipart field needs a name".to_owned(),
                ))
            }
        }
    }
    let purpose = purpose.ok_or_else(|| ApiError::invalid("purpose", "`purpose` is required"))?;
    let purpose = Purpose::parse(&purpose).ok_or_else(|| {
        ApiError::invalid(
            "purpose",
            format!("`purpose` must be \"batch\", got {purpose:?}"),
        )
    })?;
    let (upload, filename) =
        upload.ok_or_else(|| ApiError::invalid("file", "`file` is required"))?;
    let object = service.create_file(upload, filename, purpose).await?;
    Ok(axum::Json(object).into_response())
}

/// The query of `GET /v1/files`.
#[derive(Debug, Deserialize)]
struct ListFilesQuery {
    purpose: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
    order: Option<String>,
}

async fn list_files(
    State(state): State<AppState>,
    q: Result<Query<ListFilesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let service = service(&state)?;
    let q = query(q)?;
    let purpose = match q.purpose.as_deref() {
        None => None,
        Some(p) => Some(Purpose::parse(p).ok_or_else(|| {
            ApiError::invalid("purpose", format!("no file has purpose {p:?} here"))
        })?),
    };
    let ascending = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "order",
                format!("`order` must be \"asc\" or \"desc\", got {other:?}"),
            ))
        }
    };
    let page = service.list_files(purpose, q.limit, q.after.as_deref(), ascending)?;
    Ok(axum::Json(page).into_response())
}

async fn file(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let object = service(&state)?.file(&path_id(id)?)?;
    Ok(axum::Json(object).into_response())
}

async fn delete_file(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let deleted = service(&state)?.delete_file(&path_id(id)?).await?;
    Ok(axum::Json(deleted).into_response())
}

/// `GET /v1/files/{id}/content`: the bytes as stored, streamed from disk.
async fn file_content(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let (object, path) = service(&state)?.file_content(&path_id(id)?)?;
    // Once open, the content stays readable even if the file is deleted meanwhile.
    let handle = tokio::fs::File::open(&path).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            // Deleted since it was looked up.
            ApiError::NotFound {
                message: format!("No such File object: {}", object.id),
                param: Some("file_id"),
            }
        } else {
            ApiError::Internal(format!("opening {}: {e}", path.display()))
        }
    })?;
    let bytes = handle
        .metadata()
        .await
        .map_err(|e| ApiError::Internal(format!("reading {}: {e}", path.display())))?
        .len();
    let chunks = futures::stream::try_unfold(handle, |mut handle| async move {
        let mut buffer = vec![0u8; DOWNLOAD_CHUNK_BYTES];
        let read = handle.read(&mut buffer).await?;
        if read == 0 {
            return Ok::<_, std::io::Error>(None);
        }
        buffer.truncate(read);
        Ok(Some((Bytes::from(buffer), handle)))
    });
    let disposition = format!("attachment; filename=\"{}\"", object.id);
    let mut response = Body::from_stream(chunks).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes));
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

async fn create_batch(
    State(state): State<AppState>,
    Json(request): Json<CreateBatch>,
) -> Result<Response, ApiError> {
    let batch = service(&state)?.create_batch(request).await?;
    Ok(axum::Json(batch).into_response())
}

/// The query of `GET /v1/batches`.
#[derive(Debug, Deserialize)]
struct ListBatchesQuery {
    limit: Option<usize>,
    after: Option<String>,
}

async fn list_batches(
    State(state): State<AppState>,
    q: Result<Query<ListBatchesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let service = service(&state)?;
    let q = query(q)?;
    let page = service.list_batches(q.limit, q.after.as_deref())?;
    Ok(axum::Json(page).into_response())
}

async fn batch(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let batch = service(&state)?.batch(&path_id(id)?)?;
    Ok(axum::Json(batch).into_response())
}

async fn cancel_batch(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let batch = service(&state)?.cancel(&path_id(id)?).await?;
    Ok(axum::Json(batch).into_response())
}
