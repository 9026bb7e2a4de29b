# meshid: one image for server, agent, sidecar and injector.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin meshid

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/meshid /usr/local/bin/meshid
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/meshid"]
