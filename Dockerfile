FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/tailcache tailcache && mkdir -p /var/lib/tailcache && chown tailcache /var/lib/tailcache
COPY --from=build /src/target/release/tailcache /usr/local/bin/tailcache
USER tailcache
ENTRYPOINT ["/usr/local/bin/tailcache"]
CMD ["run", "--config", "/etc/tailcache/tailcache.toml"]
