//! The tower plumbing of the harness's client layers ([`counting`](crate::counting),
//! [`faults`](crate::faults)): a [`Hook`] looks at each request as the client makes it and
//! decides what becomes of it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use kube::Client;
use kube::client::{Body, ClientBuilder, DynBody};
use tower::{BoxError, Layer, Service};

/// What the API server (or a hook in its place) answered.
pub type Reply = Result<Response<Box<DynBody>>, BoxError>;

/// A request on its way, or an answer made up in its place.
pub type Pending = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// What a client layer does to each request.
pub trait Hook: Clone + Send + Sync + 'static {
    /// What the hook keeps of a request for [`Hook::answer`].
    type Seen: Send + 'static;

    /// Looks at a request as it is made, before it goes on.
    fn see(&self, request: &Request<Body>) -> Self::Seen;

    /// The request's answer. `send` sends the request when first polled, and not before, so a
    /// hook can hold the request back, drop it, or answer in its place.
    fn answer(&self, seen: Self::Seen, send: Pending) -> Pending;
}

/// A kube client for `config` whose every request goes through `hook`.
pub fn client(config: kube::Config, hook: impl Hook) -> anyhow::Result<Client> {
    Ok(ClientBuilder::try_from(config)?
        .with_layer(&Intercept(hook))
        .build())
}

/// The tower layer that puts a [`Hook`] in front of a client's service stack.
#[derive(Clone)]
pub struct Intercept<H>(pub H);

impl<S, H: Hook> Layer<S> for Intercept<H> {
    type Service = Intercepted<S, H>;
    fn layer(&self, inner: S) -> Self::Service {
        Intercepted {
            inner,
            hook: self.0.clone(),
        }
    }
}

pub struct Intercepted<S, H> {
    inner: S,
    hook: H,
}

impl<S, H> Service<Request<Body>> for Intercepted<S, H>
where
    S: Service<Request<Body>, Response = Response<Box<DynBody>>, Error = BoxError>,
    S::Future: Send + 'static,
    H: Hook,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pending;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let seen = self.hook.see(&request);
        let send = Box::pin(self.inner.call(request));
        self.hook.answer(seen, send)
    }
}
