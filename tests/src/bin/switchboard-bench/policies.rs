//! `policies`: what the resilience policies cost when nothing fails. Both sides `send` on the
//! in-memory transport to the same echo handler; `switchboard` goes through the full stack of
//! policies (timeout, attempt timeout, retry, circuit breaker, bulkhead, load shedding,
//! fallback), `raw` is the plain client. Limits are set high enough never to bite.

use std::time::Duration;

use switchboard::resilience::{
    Bulkhead, CircuitBreaker, Fallback, LoadShed, Policies, Policy, Resilient, Retry,
};

use crate::sb::ECHO;
use crate::workload::{self, Counts, Figure, Person, person};

/// Every policy at once, none of them rejecting anything at 64 calls in flight.
fn full_stack() -> Policies {
    Policies::new().pattern(
        ECHO,
        Policy::new()
            .timeout(Duration::from_secs(5))
            .attempt_timeout(Duration::from_secs(2))
            .retry(Retry::attempts(3))
            .circuit_breaker(CircuitBreaker::new())
            .bulkhead(Bulkhead::new(1_024, 1_024))
            .load_shed(LoadShed::new(4_096))
            .fallback(Fallback::value(&person(0)).expect("encodes")),
    )
}

pub(crate) async fn run(system: &str, url: &str, c: &Counts) -> Vec<Figure> {
    let client = switchboard::connect(url).await.expect("connect client");
    let figs = if system == "raw" {
        let cl = client.clone();
        workload::request_reply(c, move |i| {
            let client = cl.clone();
            async move {
                let r: Person = client.send(ECHO, &person(i)).await.expect("send");
                assert_eq!(r.id, i);
            }
        })
        .await
    } else {
        let resilient = Resilient::new(client.clone(), full_stack()).expect("valid policies");
        workload::request_reply(c, move |i| {
            let client = resilient.clone();
            async move {
                let r: Person = client.send(ECHO, &person(i)).await.expect("send");
                assert_eq!(r.id, i);
            }
        })
        .await
    };
    client.shutdown().await.expect("shutdown");
    figs
}
