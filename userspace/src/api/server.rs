//! The daemon's HTTP server: one [`Manager`] behind a mutex, operations run off the async
//! threads, every request checked to come from outside any branch.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    extract::{ConnectInfo, Path as UrlPath, RawQuery, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post, put},
    serve::IncomingStream,
};
use tokio::net::UnixListener;

use super::{RunRequest, Status};
use crate::{
    branch::{CommitOptions, ForkOptions, Manager},
    error::{Error, IoContext, Result},
};

#[derive(Clone)]
struct App {
    manager: Arc<Mutex<Manager>>,
    state_dir: PathBuf,
    metrics: Arc<crate::metrics::Metrics>,
    /// Where `/metrics` is served, if it is.
    metrics_addr: Option<std::net::SocketAddr>,
    /// One scrape at a time.
    scraping: Arc<tokio::sync::Mutex<()>>,
    /// Turns true when the daemon starts stopping: requests that could last (a followed
    /// trace, an `exec`) end then, so that stopping waits for none of them.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl App {
    /// Completes once the daemon starts stopping.
    async fn stopping(&self) {
        let mut rx = self.stopping.clone();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Waits a tenth of a second before a followed trace looks again; false if the daemon
    /// started stopping meanwhile (the stream ends).
    async fn follow_pause(&self) -> bool {
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_millis(100)) => true,
            () = self.stopping() => false,
        }
    }
}

/// Largest request body taken (an `exec`'s stdin is in it).
const MAX_BODY: usize = 64 << 20;

/// Every error answer as the API documents it, `{"error": "..."}`: those the router and
/// the extractors make themselves (no such path, a method a path does not take, a body
/// too large) come as plain text or empty.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let error = match status {
        StatusCode::NOT_FOUND => {
            "no such API path: the API serves /v1/status and /v1/branches[/NAME[/fork|/exec|/diff|/commit|/policy|/effects|/trace]] (see docs/architecture.md)".to_string()
        }
        StatusCode::METHOD_NOT_ALLOWED => {
            "this path does not take that method: the answer's Allow header lists those it takes"
                .to_string()
        }
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "the request body is larger than the daemon takes ({} MiB): pass large inputs through a file in the workspace",
            MAX_BODY >> 20
        ),
        _ if text.is_empty() => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string(),
        _ => text,
    };
    let mut out = (status, Json(serde_json::json!({ "error": error }))).into_response();
    for (name, value) in &parts.headers {
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().insert(name, value.clone());
        }
    }
    out
}

/// How long a stopping daemon waits for requests still being answered.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Who is on the other end of a connection (SO_PEERCRED).
#[derive(Clone, Debug)]
struct Peer {
    pid: Option<i32>,
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        Peer {
            pid: stream.io().peer_cred().ok().and_then(|c| c.pid()),
        }
    }
}

/// Whether process `pid` runs inside a forkscope branch (its cgroup is a branch's).
fn inside_branch(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map(|t| {
            t.lines()
                .any(|l| l.starts_with("0::") && l.contains("/forkscope/branch-"))
        })
        .unwrap_or(false)
}

struct ApiError(Error);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            Error::Invalid(_) | Error::NoCommand => StatusCode::BAD_REQUEST,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Conflict(_) | Error::Conflicts { .. } | Error::CannotClone(_) => {
                StatusCode::CONFLICT
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut body = serde_json::json!({ "error": self.0.to_string() });
        if let Error::Conflicts { paths, .. } = &self.0 {
            body["conflicts"] = serde_json::json!(paths);
        }
        (status, Json(body)).into_response()
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

/// Runs `f` on the manager in a blocking thread, refusing callers from inside a branch.
async fn with_manager<T: Send + 'static>(
    app: &App,
    peer: &Peer,
    f: impl FnOnce(&mut Manager) -> Result<T> + Send + 'static,
) -> ApiResult<T> {
    if peer.pid.is_some_and(inside_branch) {
        return Err(ApiError(Error::Forbidden(
            "requests from inside a branch are refused".into(),
        )));
    }
    let manager = app.manager.clone();
    tokio::task::spawn_blocking(move || {
        let mut m = manager.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut m)
    })
    .await
    .map_err(|e| ApiError(Error::State(format!("worker failed: {e}"))))?
    .map_err(ApiError)
}

async fn status(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> ApiResult<Json<Status>> {
    let dir = app.state_dir.clone();
    let (n, trace) =
        with_manager(&app, &peer, |m| Ok((m.list()?.len(), m.trace_status()?))).await?;
    Ok(Json(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        state_dir: dir,
        branches: n,
        trace,
        metrics_addr: app.metrics_addr.map(|a| a.to_string()),
    }))
}

async fn list(State(app): State<App>, ConnectInfo(peer): ConnectInfo<Peer>) -> ApiResult<Response> {
    let l = with_manager(&app, &peer, |m| m.list()).await?;
    Ok(Json(l).into_response())
}

/// Parses a JSON request body, answering 400 with `{"error": ...}` when it does not fit.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError(Error::Invalid(format!("bad request body: {e}"))))
}

async fn run(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    bytes: axum::body::Bytes,
) -> ApiResult<Response> {
    let req: RunRequest = body(&bytes)?;
    let b = with_manager(&app, &peer, move |m| {
        let isolated = match req.net.as_deref() {
            None | Some("host") => false,
            Some("isolated") => true,
            Some(other) => {
                return Err(Error::Invalid(format!(
                    "net {other:?}: use \"host\" (the default) or \"isolated\""
                )));
            }
        };
        let write_detail = match req.write_detail.as_deref() {
            None | Some("on") => true,
            Some("off") => false,
            Some(other) => {
                return Err(Error::Invalid(format!(
                    "write_detail {other:?}: use \"on\" (the default) or \"off\""
                )));
            }
        };
        let policy = req
            .policy
            .as_deref()
            .map(crate::policy::parse)
            .transpose()?;
        let options = crate::branch::RunOptions {
            net_isolated: isolated,
            write_detail,
            policy,
        };
        m.run_with(req.name, &req.workspace, req.command, options)
    })
    .await?;
    prewarm(&app, b.name.clone());
    Ok((StatusCode::CREATED, Json(b)).into_response())
}

/// Pre-starts the sandbox of `name`'s next child after the reply, holding the manager only
/// to prepare and to keep it (see [`crate::branch::Warming`]): requests made meanwhile do
/// not wait for the start. A failure only costs the next fork its speed.
fn prewarm(app: &App, name: String) {
    let manager = app.manager.clone();
    tokio::task::spawn_blocking(move || {
        let lock = || manager.lock().unwrap_or_else(|p| p.into_inner());
        let warming = lock().prewarm_begin(&name);
        let kept = match warming {
            Ok(Some(w)) => {
                let slot = w.start();
                lock().prewarm_end(&name, &slot)
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = kept {
            log::warn!("pre-starting the next child sandbox of {name}: {e}");
        }
    });
}

async fn get_branch(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Response> {
    let b = with_manager(&app, &peer, move |m| {
        m.list()?
            .into_iter()
            .find(|b| b.record.name == name)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no live branch named {name:?} (see `forkscope ls`)"
                ))
            })
    })
    .await?;
    Ok(Json(b).into_response())
}

async fn fork(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
    bytes: axum::body::Bytes,
) -> ApiResult<Response> {
    let req: ForkOptions = if bytes.is_empty() {
        ForkOptions::default()
    } else {
        body(&bytes)?
    };
    let parent = name.clone();
    // Timed where it runs (not waiting for the manager), and recorded there: a client that
    // goes away does not lose the observation of a fork that happened.
    let metrics = app.metrics.clone();
    let made = with_manager(&app, &peer, move |m| {
        let t = std::time::Instant::now();
        let made = m.fork(&name, &req)?;
        metrics.fork_seconds.observe(t.elapsed().as_secs_f64());
        metrics.fork_phases(&made.phases);
        Ok(made)
    })
    .await?;
    prewarm(&app, parent);
    Ok((StatusCode::CREATED, Json(made)).into_response())
}

async fn set_policy(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
    bytes: axum::body::Bytes,
) -> ApiResult<Response> {
    let req: super::PolicyRequest = body(&bytes)?;
    let b = with_manager(&app, &peer, move |m| {
        let policy = crate::policy::parse(&req.policy)?;
        m.set_policy(&name, policy)
    })
    .await?;
    Ok(Json(b).into_response())
}

/// Runs a command in the branch and answers with its exit code and output once it exits
/// (the manager is not held meanwhile: many at once).
async fn exec_in(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
    bytes: axum::body::Bytes,
) -> ApiResult<Response> {
    let input: crate::branch::run_in::ExecInput = body(&bytes)?;
    let control = with_manager(&app, &peer, move |m| m.control_of(&name)).await?;
    // The request over (answered, or its client gone, which drops this future), the guard
    // goes: a command still running is killed (its init sees the control connection shut
    // down) and the worker freed.
    let guard = CancelOnDrop(Arc::default());
    let cancel = guard.0.clone();
    let worker = tokio::task::spawn_blocking(move || {
        crate::branch::run_in::run_in(&control, input, &cancel)
    });
    let out = tokio::select! {
        out = worker => out
            .map_err(|e| ApiError(Error::State(format!("worker failed: {e}"))))?
            .map_err(ApiError)?,
        () = app.stopping() => {
            return Err(ApiError(Error::Unavailable(
                "the daemon is stopping: the command was stopped; run it again once the daemon is back".into(),
            )));
        }
    };
    Ok(Json(out).into_response())
}

/// Cancels an `exec` when dropped (the request is over, answered or not).
struct CancelOnDrop(Arc<crate::sandbox::control::Cancel>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn effects(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Response> {
    let e = with_manager(&app, &peer, move |m| m.effects(&name)).await?;
    Ok(Json(e).into_response())
}

async fn diff(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Response> {
    let d = with_manager(&app, &peer, move |m| m.diff(&name)).await?;
    Ok(Json(d).into_response())
}

async fn commit(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
    bytes: axum::body::Bytes,
) -> ApiResult<Response> {
    let req: CommitOptions = if bytes.is_empty() {
        CommitOptions::default()
    } else {
        body(&bytes)?
    };
    let metrics = app.metrics.clone();
    let done = with_manager(&app, &peer, move |m| {
        let t = std::time::Instant::now();
        let done = m.commit(&name, &req)?;
        metrics.commit_seconds.observe(t.elapsed().as_secs_f64());
        Ok(done)
    })
    .await?;
    Ok(Json(done).into_response())
}

/// Whether the query string sets `name=true` (or `name=1`).
fn query_flag(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .any(|(k, v)| k == name && (v == "true" || v == "1"))
    })
}

/// A branch's trace as JSON lines; with `?follow=true`, kept open and fed as events arrive
/// until the branch is aborted or the client goes away.
async fn trace_stream(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let follow = query_flag(query.as_deref(), "follow");
    let (file, dir, tracker) = with_manager(&app, &peer, move |m| {
        // (A retired branch's trace stays readable until it goes.)
        let b = m.get_any(&name)?;
        Ok((crate::branch::trace_file(&b), b.dir.clone(), m.tracker()))
    })
    .await?;
    let Some(tracker) = tracker else {
        return Err(ApiError(Error::Conflict(
            "this daemon does not trace branches (it was started with --no-trace)".into(),
        )));
    };
    // What the branch did until now is in the file before it is read (an `exec` that just
    // returned: its events are in the ring buffer, drained every 20 ms otherwise).
    let _ = tokio::task::spawn_blocking(move || tracker.sync()).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<axum::body::Bytes>(16);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut f = loop {
            match tokio::fs::File::open(&file).await {
                Ok(f) => break f,
                Err(_) if follow && dir.exists() && !tx.is_closed() => {
                    if !app.follow_pause().await {
                        return;
                    }
                }
                Err(_) => return,
            }
        };
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match f.read(&mut buf).await {
                Ok(0) => {
                    if !follow || !dir.exists() || tx.is_closed() || !app.follow_pause().await {
                        return;
                    }
                }
                Ok(n) => {
                    let chunk = axum::body::Bytes::copy_from_slice(&buf[..n]);
                    if tx.send(chunk).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::io::Error>(chunk), rx))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

async fn abort(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<StatusCode> {
    let recursive = query_flag(query.as_deref(), "recursive");
    let metrics = app.metrics.clone();
    with_manager(&app, &peer, move |m| {
        let t = std::time::Instant::now();
        if recursive {
            m.abort_tree(&name).map(|_| ())?;
        } else {
            m.abort(&name)?;
        }
        metrics.abort_seconds.observe(t.elapsed().as_secs_f64());
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes the tracer's pins when dropped holding it (a start that failed).
struct UnpinOnFailure(Option<Arc<crate::tracker::Tracker>>);

impl Drop for UnpinOnFailure {
    fn drop(&mut self) {
        if let Some(t) = self.0.take()
            && let Err(e) = t.unpin()
        {
            log::warn!("removing the eBPF pins after a failed start: {e}");
        }
    }
}

/// How the daemon serves.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// The forkscope binary branches' inits run.
    pub forkscope_bin: PathBuf,
    /// Load the eBPF programs and keep per-branch traces.
    pub trace: bool,
    /// A group whose members may use the socket too (mode 0660); else root only (0600).
    pub socket_group: Option<String>,
    /// Where the recording proxy for `buffer` rules listens.
    pub proxy_addr: std::net::SocketAddrV4,
    /// Where Prometheus scrapes `/metrics` (none: not served).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Per-branch metric series allowed (0: none).
    pub metrics_branch_labels: usize,
    /// How long the syscall programs stay attached after the last branch that asked for
    /// per-write detail goes.
    pub detach_grace: std::time::Duration,
}

/// `GET /metrics`: the figures read now (see [`crate::metrics`]). One scrape runs at a
/// time (the others wait without taking a thread, then get its text).
async fn serve_metrics(State(app): State<App>) -> Response {
    let _one = app.scraping.lock().await;
    let (manager, m) = (app.manager.clone(), app.metrics.clone());
    let rendered = tokio::task::spawn_blocking(move || {
        m.scrape(|| {
            let sources = manager
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .metrics_sources();
            crate::branch::metrics_snapshot(sources)
        })
    })
    .await;
    match rendered {
        Ok(Ok(text)) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Serves the API for the branches of `opts.state_dir` on `opts.socket` until `shutdown`
/// completes.
pub async fn serve(
    opts: &ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (state_dir, socket, forkscope_bin) = (
        opts.state_dir.as_path(),
        opts.socket.as_path(),
        opts.forkscope_bin.as_path(),
    );
    let group = match &opts.socket_group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .map_err(|e| Error::Invalid(format!("looking up group {name:?}: {e}")))?
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "--socket-group {name:?}: no such group (create it with groupadd, or leave the option out for root only)"
                    ))
                })?
                .gid,
        ),
        None => None,
    };
    // Bound first: an address in use fails before anything else is made.
    let metrics_listener = match opts.metrics_addr {
        Some(addr) => Some(super::listen::bind_tcp(addr).await.map_err(|e| {
            Error::Invalid(format!(
                "the metrics address {addr} cannot be used: {e} (another daemon there? choose another with --metrics-addr, or --metrics-addr off)"
            ))
        })?),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let mut manager = Manager::open(state_dir, forkscope_bin)?;
    if !opts.trace
        && let Some(b) = manager.list()?.into_iter().find(|b| {
            !b.record.retired
                && b.record
                    .policy
                    .as_ref()
                    .is_some_and(crate::policy::Policy::needs_hooks)
        })
    {
        return Err(Error::Invalid(format!(
            "branch {} has a network policy, which the eBPF programs enforce: start the daemon without --no-trace (or abort the branch first)",
            b.record.name
        )));
    }
    let tracker = if opts.trace {
        let tracker = crate::tracker::Tracker::start(
            &crate::bpf::ProbeOptions::default(),
            &manager.instance_tag(),
            opts.detach_grace,
        )
        .map_err(|e| {
            Error::State(format!(
                "loading the eBPF programs for per-branch traces: {e} (start the daemon with --no-trace to run without traces)"
            ))
        })?;
        let tracker = Arc::new(tracker);
        manager.set_tracker(tracker.clone())?;
        tracker.start_reading()?;
        if tracker.adopted {
            log::info!("adopted the pinned eBPF programs: branch tracing went on meanwhile");
        }
        Some(tracker)
    } else {
        crate::tracker::Tracker::remove_pins(&manager.instance_tag())?;
        None
    };
    // Should the start fail from here on, with no branch to trace the programs go, as at a
    // normal stop (a failed start leaves nothing attached).
    let mut unpin_on_failure = UnpinOnFailure(
        tracker
            .clone()
            .filter(|_| manager.list().map(|l| l.is_empty()).unwrap_or(false)),
    );
    let journal = crate::effects::Journal::open(state_dir)?;
    manager.set_effects(journal.clone())?;
    if let Some(t) = &tracker {
        let (policies, passes) = (t.clone(), t.clone());
        manager.set_deferrals(crate::effects::defer::Deferrals::new(
            journal.clone(),
            Box::new(move |cgroup| policies.policy(cgroup)),
            Box::new(move |tid, ip, port| passes.grant_defer(tid, ip, port)),
        ))?;
        let dir = Arc::new(crate::tracker::ProxyDirectory(t.clone()));
        let at = crate::effects::proxy::start(opts.proxy_addr.into(), journal, dir).await?;
        if let std::net::SocketAddr::V4(v4) = at {
            t.set_proxy(v4)?;
        }
        log::info!("recording proxy for buffered effects on {at}");
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).at(dir)?;
        // Branches do not even see the socket (the peer check below is the second line).
        manager.hide(dir);
    }
    if super::listen::held_by_a_live_process(socket).await {
        return Err(Error::Conflict(format!(
            "another daemon is listening on {}: stop it or use another --socket",
            socket.display()
        )));
    }
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).at(socket)?;
    let bound = super::listen::identity(socket);
    let mode = match group {
        Some(gid) => {
            nix::unistd::chown(socket, None, Some(gid))
                .map_err(|e| Error::State(format!("chown {}: {e}", socket.display())))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .at(socket)?;
    let metrics = Arc::new(crate::metrics::Metrics::new(opts.metrics_branch_labels)?);
    // The kernel counts the eBPF programs' run time while this is open.
    let _bpf_stats = tracker.as_ref().and_then(|_| crate::bpf::enable_stats());
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let app = App {
        manager: Arc::new(Mutex::new(manager)),
        state_dir: state_dir.to_path_buf(),
        metrics,
        metrics_addr,
        scraping: Arc::new(tokio::sync::Mutex::new(())),
        stopping: stopping_rx,
    };
    if let Some(l) = metrics_listener {
        let router = Router::new()
            .route("/metrics", get(serve_metrics))
            .with_state(app.clone());
        log::info!("metrics on http://{}/metrics", metrics_addr.expect("bound"));
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, router).await {
                log::warn!("the metrics server stopped: {e}");
            }
        });
    }
    unpin_on_failure.0 = None; // started
    let app_for_shutdown = app.clone();
    let router = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/branches", get(list).post(run))
        .route("/v1/branches/{name}", get(get_branch).delete(abort))
        .route("/v1/branches/{name}/fork", post(fork))
        .route("/v1/branches/{name}/diff", get(diff))
        .route("/v1/branches/{name}/policy", put(set_policy))
        .route("/v1/branches/{name}/effects", get(effects))
        .route("/v1/branches/{name}/exec", post(exec_in))
        .route("/v1/branches/{name}/commit", post(commit))
        .route("/v1/branches/{name}/trace", get(trace_stream))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(app);
    // Once asked to stop: no new connection, the long requests told to end, and at most
    // STOP_GRACE for the others, so a client that never reads cannot hold the daemon.
    let mut stop_seen = stopping_tx.subscribe();
    let stop_now = stopping_tx;
    let served = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stop_now.send(true);
    });
    let served = tokio::select! {
        served = served => served,
        () = async move {
            let _ = stop_seen.wait_for(|s| *s).await;
            tokio::time::sleep(STOP_GRACE).await;
        } => {
            log::warn!("requests still open {STOP_GRACE:?} after the daemon was asked to stop: closed");
            Ok(())
        }
    };
    // Only the file this daemon bound (a later daemon may have replaced it).
    if bound.is_some() && super::listen::identity(socket) == bound {
        let _ = std::fs::remove_file(socket);
    }
    // With no branch left, nothing needs tracing: the programs go. Otherwise they stay
    // pinned and keep recording for the next daemon.
    if let Some(t) = tracker {
        let idle = app_for_shutdown
            .manager
            .lock()
            .map(|m| m.list().map(|l| l.is_empty()).unwrap_or(false))
            .unwrap_or(false);
        if idle {
            t.unpin()?;
        }
    }
    served.map_err(Error::Other)
}
