//! Serving components that export `wasi:http/incoming-handler` (the
//! `wasi:http/proxy` world) from Elixir (`Capsid.HTTP`): an Elixir request
//! becomes wasmtime-wasi-http's incoming request, the guest's response a
//! value. (A guest's own outbound requests are a WASI capability: `wasi.rs`.)

use crate::error::{Error, HostTrap, TrapKind};
use crate::shape::Shape;
use crate::value::Value;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http_body_util::BodyExt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::Poll;
use wasmtime::Store;
use wasmtime::component::{Func, Resource};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme as WasiScheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::p2::types::{HostIncomingRequest, HostResponseOutparam};

/// The name Elixir calls to serve a request (`Capsid.HTTP.handle/3`).
pub const SERVE: &[u8] = b"[http]";

fn headers_shape() -> Shape {
    Shape::List(Box::new(Shape::Tuple(Box::new([
        Shape::Bytes,
        Shape::Bytes,
    ]))))
}

/// `{method, scheme, authority, path_with_query, headers, body}` and
/// `{fresh, max_body}`, as `Capsid.HTTP` passes them.
pub fn request_shapes() -> &'static [Shape; 2] {
    static SHAPES: OnceLock<[Shape; 2]> = OnceLock::new();
    SHAPES.get_or_init(|| {
        [
            Shape::Tuple(Box::new([
                Shape::String,
                Shape::String,
                Shape::String,
                Shape::String,
                headers_shape(),
                Shape::Bytes,
            ])),
            Shape::Tuple(Box::new([Shape::Bool, Shape::U64])),
        ]
    })
}

/// `{status, headers, body}`.
pub fn response_shape() -> &'static Shape {
    static SHAPE: OnceLock<Shape> = OnceLock::new();
    SHAPE.get_or_init(|| Shape::Tuple(Box::new([Shape::U16, headers_shape(), Shape::Bytes])))
}

/// Whether an export is `wasi:http/incoming-handler`'s `handle`.
pub fn is_handler(interface: Option<&str>, function: &str) -> bool {
    function == "handle"
        && interface
            .is_some_and(|i| crate::component::strip_version(i) == "wasi:http/incoming-handler")
}

struct Request {
    request: http::Request<Bytes>,
    scheme: WasiScheme,
    fresh: bool,
    max_body: u64,
}

fn bad(message: String) -> Error {
    Error::BadArgument(message)
}

/// The request `Capsid.HTTP` passed (as converted by `request_shapes`),
/// checked: an invalid method, URI or header is the caller's error.
fn request(args: &[Value]) -> Result<Request, Error> {
    let malformed = || Error::Internal("malformed HTTP request".into());
    let [Value::Fields(req), Value::Fields(opts)] = args else {
        return Err(malformed());
    };
    let [
        Value::String(method),
        Value::String(scheme),
        Value::String(authority),
        Value::String(path),
        Value::List(headers),
        Value::Bytes(body),
    ] = req.as_slice()
    else {
        return Err(malformed());
    };
    let [Value::Bool(fresh), Value::U64(max_body)] = opts.as_slice() else {
        return Err(malformed());
    };
    let method = http::Method::from_bytes(method.as_bytes())
        .map_err(|_| bad(format!("invalid HTTP method {method:?}")))?;
    let (uri_scheme, wasi_scheme) = match scheme.as_str() {
        "http" => (Scheme::HTTP, WasiScheme::Http),
        "https" => (Scheme::HTTPS, WasiScheme::Https),
        other => {
            return Err(bad(format!(
                "invalid scheme {other:?}: expected http or https"
            )));
        }
    };
    let authority = Authority::try_from(authority.as_str())
        .map_err(|_| bad(format!("invalid authority {authority:?}")))?;
    if !path.starts_with('/') {
        return Err(bad(format!(
            "invalid path {path:?}: expected a path starting with \"/\" (and an optional query)"
        )));
    }
    let path =
        PathAndQuery::try_from(path.as_str()).map_err(|_| bad(format!("invalid path {path:?}")))?;
    let uri = Uri::builder()
        .scheme(uri_scheme)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|e| bad(format!("invalid request URI: {e}")))?;
    let mut builder = http::Request::builder().method(method).uri(uri);
    for h in headers {
        let Value::Fields(pair) = h else {
            return Err(malformed());
        };
        let [Value::Bytes(name), Value::Bytes(value)] = pair.as_slice() else {
            return Err(malformed());
        };
        let name = HeaderName::from_bytes(name).map_err(|_| {
            bad(format!(
                "invalid header name {:?}",
                String::from_utf8_lossy(name)
            ))
        })?;
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| bad(format!("invalid value for header {name}")))?;
        builder = builder.header(name, value);
    }
    let request = builder
        .body(Bytes::from(body.clone()))
        .map_err(|e| bad(format!("invalid request: {e}")))?;
    Ok(Request {
        request,
        scheme: wasi_scheme,
        fresh: *fresh,
        max_body: *max_body,
    })
}

/// Checks a request before the call takes its instance's turn.
pub fn check(args: &[Value]) -> Result<(), Error> {
    request(args).map(|_| ())
}

fn trap(kind: TrapKind, message: String) -> wasmtime::Error {
    wasmtime::Error::new(HostTrap { kind, message })
}

type BodyFuture = Pin<Box<dyn Future<Output = wasmtime::Result<Vec<u8>>> + Send>>;

/// Reads a response body, at most `max` bytes of it.
fn collect(mut body: HyperOutgoingBody, max: u64) -> BodyFuture {
    Box::pin(async move {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                trap(
                    TrapKind::Other,
                    format!("the guest's response body failed: {e}"),
                )
            })?;
            if let Ok(data) = frame.into_data() {
                if (out.len() + data.len()) as u64 > max {
                    return Err(trap(
                        TrapKind::MemoryLimit,
                        format!("the guest's response body exceeds max_body ({max} bytes)"),
                    ));
                }
                out.extend_from_slice(&data);
            }
        }
        Ok(out)
    })
}

/// A request the guest has answered: status and headers known, the body
/// still being read.
pub struct Answered {
    status: u16,
    headers: Vec<Value>,
    body: BodyFuture,
    /// The instance must not serve another request (`instance: :fresh`):
    /// dropping its store also ends a body the guest never finished.
    pub fresh: bool,
}

impl Answered {
    /// The whole response as `{status, headers, body}`.
    pub async fn response(self) -> wasmtime::Result<Value> {
        let body = self.body.await?;
        Ok(Value::Fields(vec![
            Value::U16(self.status),
            Value::List(self.headers),
            Value::Bytes(body),
        ]))
    }
}

/// What the guest hands `response-outparam.set`.
type Outcome = Result<http::Response<HyperOutgoingBody>, ErrorCode>;

/// Runs the guest's `handle` on `request`, reading the response body while
/// the guest writes it (its stream holds one chunk at a time).
pub async fn serve(
    store: &mut Store<crate::host::Host>,
    func: Func,
    mut args: Vec<Value>,
) -> wasmtime::Result<Answered> {
    // The body moves into the request rather than being copied by
    // `request` (field 5 of the request tuple, see `request_shapes`).
    let body = match args.first_mut() {
        Some(Value::Fields(fields)) => match fields.get_mut(5) {
            Some(Value::Bytes(b)) => std::mem::take(b),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    let req = request(&args).map_err(|e| trap(TrapKind::Other, e.to_string()))?;
    drop(args);
    let (tx, mut rx) = tokio::sync::oneshot::channel::<Outcome>();
    let (incoming, outparam) = {
        let mut view = store.data_mut().http();
        let (parts, _) = req.request.into_parts();
        let body = http_body_util::Full::new(Bytes::from(body)).map_err(
            |never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} },
        );
        let incoming =
            view.new_incoming_request(req.scheme, http::Request::from_parts(parts, body))?;
        let outparam = view.new_response_outparam(tx)?;
        (incoming, outparam)
    };
    let typed = func.typed::<(
        Resource<HostIncomingRequest>,
        Resource<HostResponseOutparam>,
    ), ()>(&*store)?;
    let max = req.max_body;
    let mut head: Option<Result<(u16, Vec<Value>), ErrorCode>> = None;
    let mut body: Option<BodyFuture> = None;
    let mut read: Option<wasmtime::Result<Vec<u8>>> = None;
    {
        let mut call = std::pin::pin!(typed.call_async(&mut *store, (incoming, outparam)));
        poll_fn(|cx| {
            if head.is_none()
                && let Poll::Ready(Ok(outcome)) = Pin::new(&mut rx).poll(cx)
            {
                head = Some(outcome.map(|r| answer(r, max, &mut body)));
            }
            if read.is_none()
                && let Some(b) = body.as_mut()
                && let Poll::Ready(r) = b.as_mut().poll(cx)
            {
                read = Some(r);
            }
            call.as_mut().poll(cx)
        })
        .await?;
    }
    if head.is_none()
        && let Ok(outcome) = rx.try_recv()
    {
        head = Some(outcome.map(|r| answer(r, max, &mut body)));
    }
    let (status, headers) = match head {
        Some(Ok(h)) => h,
        Some(Err(code)) => {
            return Err(trap(
                TrapKind::Other,
                format!("the guest answered the request with an error: {code:?}"),
            ));
        }
        None => {
            return Err(trap(
                TrapKind::Other,
                "the guest returned from wasi:http/incoming-handler#handle without setting a \
                 response (response-outparam.set); a component that serves one request per \
                 instance needs instance: :fresh"
                    .into(),
            ));
        }
    };
    let body = match (read, body) {
        (Some(r), _) => Box::pin(async move { r }) as BodyFuture,
        (None, Some(b)) => b,
        (None, None) => Box::pin(async { Ok(Vec::new()) }),
    };
    Ok(Answered {
        status,
        headers,
        body,
        fresh: req.fresh,
    })
}

/// The response's status and headers; its body starts being read.
fn answer(
    response: http::Response<HyperOutgoingBody>,
    max: u64,
    body: &mut Option<BodyFuture>,
) -> (u16, Vec<Value>) {
    let (parts, b) = response.into_parts();
    *body = Some(collect(b, max));
    (parts.status.as_u16(), header_values(&parts.headers))
}

fn header_values(headers: &http::HeaderMap) -> Vec<Value> {
    headers
        .iter()
        .map(|(k, v)| {
            Value::Fields(vec![
                Value::Bytes(k.as_str().as_bytes().to_vec()),
                Value::Bytes(v.as_bytes().to_vec()),
            ])
        })
        .collect()
}
