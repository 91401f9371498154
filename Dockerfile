# kvroute serve (and kvroute emulate, for GPU-less clusters) in one small image.
#   docker build -t kvroute:0.1.0 .
#   docker run -p 8080:8080 kvroute:0.1.0 serve --listen 0.0.0.0:8080 --backend http://vllm:8000 ...
# See deploy/kubernetes/ for the manifests that use it.
FROM rust:1-bookworm AS build
WORKDIR /src
# libzmq is built from source by the zmq crate (zeromq-src): it needs cmake and a C++ compiler.
RUN apt-get update && apt-get install -y --no-install-recommends cmake g++ && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release -p kvroute-cli && cp target/release/kvroute /usr/local/bin/kvroute

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libstdc++6 \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 kvroute
COPY --from=build /usr/local/bin/kvroute /usr/local/bin/kvroute
USER 10001
# kvroute serve's HTTP port in deploy/kubernetes; the emulator uses 8000, 5557 and 5558.
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kvroute"]
CMD ["serve", "--help"]
