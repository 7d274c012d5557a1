{{/*
Envoy's configuration: REST/JSON transcoded to mds.v1 gRPC, gRPC-Web from browsers (CORS for envoy.corsOrigins),
plain gRPC (mds.v1, V2, health, reflection) on the same port, the API docs under /docs/; each request to a healthy
server found through the headless Service.
*/}}
{{- define "mds.envoyConfig" -}}
{{- $swaggerUi := urlParse .Values.envoy.swaggerUiUrl -}}
layered_runtime:
  layers:
  - name: static
    static_layer:
      re2.max_program_size.error_level: 1000  # the regex of retriable calls
admin:
  address:
    socket_address: {address: 127.0.0.1, port_value: 9901}
static_resources:
  listeners:
  - name: mds
    address:
      socket_address: {address: 0.0.0.0, port_value: {{ .Values.envoy.port }}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: mds
          codec_type: AUTO
          stream_idle_timeout: 0s  # WatchJob and PredictStream may idle for long
          route_config:
            name: mds
            max_direct_response_body_size_bytes: 16777216
            virtual_hosts:
            - name: mds
              domains: ["*"]
              # Browsers (gRPC-Web and REST) from envoy.corsOrigins only; none unless configured.
              typed_per_filter_config:
                envoy.filters.http.cors:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy
                  allow_origin_string_match:
                  {{- range .Values.envoy.corsOrigins }}
                  - exact: {{ . | quote }}
                  {{- else }} []
                  {{- end }}
                  allow_methods: GET, POST, PUT, DELETE
                  allow_headers: authorization, content-type, x-grpc-web, x-user-agent, grpc-timeout
                  expose_headers: grpc-status, grpc-message, grpc-status-details-bin
                  max_age: "600"
                  forward_not_matching_preflights: false  # answered here, without CORS headers
              routes:
              - match: {path: "/docs"}
                redirect: {path_redirect: "/docs/"}
              - match: {path: "/docs/"}
                direct_response: {status: 200, body: {filename: /etc/mds-envoy/docs.html}}
                response_headers_to_add:
                - header: {key: content-type, value: text/html; charset=utf-8}
              - match: {path: "/docs/openapi.json"}
                direct_response: {status: 200, body: {filename: /etc/mds-envoy/openapi.json}}
                response_headers_to_add:
                - header: {key: content-type, value: application/json}
              {{- range $asset := list "swagger-ui.css" "swagger-ui-bundle.js" }}
              - match: {path: "/docs/{{ $asset }}"}
                redirect:
                  scheme_redirect: {{ $swaggerUi.scheme }}
                  host_redirect: {{ $swaggerUi.host }}
                  path_redirect: {{ printf "%s/%s" (trimSuffix "/" $swaggerUi.path) $asset | quote }}
              {{- end }}
              # A job output as an .npy file: the path of JobService.GetJobResults, with its own transcoding.
              - match:
                  safe_regex: {regex: "/v1/jobs/[^/]+/results"}
                  query_parameters: [{name: format, present_match: true}]
                route: {cluster: mds, timeout: 0s}
                typed_per_filter_config:
                  envoy.filters.http.grpc_json_transcoder:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder
                    proto_descriptor: /etc/mds-envoy/mds.protoset
                    services: [mds.v1.HttpDownloadService]
                    convert_grpc_status: true
              # PredictStream over WebSocket (docs/websocket.md): upgraded, to the servers' WebSocket ports.
              - match: {path: "/v1/predictions:ws"}
                route:
                  cluster: mds_websocket
                  timeout: 0s
                  upgrade_configs: [{upgrade_type: websocket}]
              # Calls without side effects (after transcoding, REST routes carry their gRPC path too).
              - match:
                  safe_regex: {regex: {{ include "mds.retriablePaths" . | quote }}}
                route:
                  cluster: mds
                  timeout: 0s
                  retry_policy:
                    retry_on: unavailable,cancelled,reset,connect-failure,refused-stream
                    num_retries: 2
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
                    host_selection_retry_max_attempts: 3
              - match: {prefix: "/"}
                route: {cluster: mds, timeout: 0s}
          http_filters:
          - name: envoy.filters.http.cors
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors
          # A page on another site can make a browser send a form POST (an upload) or open a WebSocket
          # without asking first: refuse a request that is neither GET, HEAD nor OPTIONS, or that
          # upgrades, when its Origin is neither this host's nor allowed. No Origin (gRPC, curl): passed.
          - name: envoy.filters.http.lua
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
              default_source_code:
                inline_string: |
                  local allowed = {{ include "mds.luaOrigins" . }}
                  function envoy_on_request(request)
                    local headers = request:headers()
                    local origin = headers:get("origin")
                    local method = headers:get(":method")
                    local reads = method == "GET" or method == "HEAD" or method == "OPTIONS"
                    if origin == nil or allowed[origin] or (reads and headers:get("upgrade") == nil) then
                      return
                    end
                    local host = string.lower(origin):gsub("^https?://", "")
                    if host ~= string.lower(headers:get(":authority") or "") then
                      request:respond({[":status"] = "403", ["content-type"] = "text/plain"},
                        "cross-origin request refused: " .. origin .. " is not an allowed origin")
                    end
                  end
          - name: envoy.filters.http.grpc_web  # gRPC-Web from browsers, as gRPC to the servers
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb
          - name: envoy.filters.http.grpc_json_transcoder
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder
              proto_descriptor: /etc/mds-envoy/mds.protoset
              services: [mds.v1.ModelService, mds.v1.InferenceService, mds.v1.JobService, mds.v1.HttpUploadService]
              convert_grpc_status: true
              print_options:
                add_whitespace: false
                always_print_primitive_fields: false
                preserve_proto_field_names: false
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
      {{- if .Values.tls.envoySecret }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificates:
            - certificate_chain: {filename: /etc/mds-envoy-tls/tls.crt}
              private_key: {filename: /etc/mds-envoy-tls/tls.key}
      {{- end }}
  clusters:
  - name: mds
    type: STRICT_DNS
    dns_lookup_family: V4_PREFERRED
    dns_refresh_rate: 1s
    connect_timeout: 2s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {}
    # Health is NOT_SERVING from the moment a server is told to stop (it drains for MDS_DRAIN_SECONDS), and while
    # its backends are down.
    health_checks:
    - timeout: 1s
      interval: 1s
      no_traffic_interval: 1s  # else 60 s between checks of a server that has had no request yet
      unhealthy_threshold: 1
      healthy_threshold: 1
      grpc_health_check: {}
    circuit_breakers:
      thresholds:
      - max_retries: 1000  # concurrent retries; the default 3 leaves calls unretried when a server dies under load
    # A server whose connections fail or reset is ejected; errors it answers with (UNAVAILABLE while a
    # backend is down, DEADLINE_EXCEEDED for a client's short deadline) never eject it.
    outlier_detection:
      split_external_local_origin_errors: true
      consecutive_local_origin_failure: 2
      enforcing_consecutive_local_origin_failure: 100
      enforcing_consecutive_5xx: 0
      enforcing_success_rate: 0
      interval: 1s
      base_ejection_time: 5s
      max_ejection_percent: 100
    {{- if .Values.tls.serverSecret }}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {{ include "mds.serverTlsName" . }}
        common_tls_context:
          alpn_protocols: [h2]
          validation_context:
            trusted_ca: {filename: /etc/mds-server-tls/ca.crt}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {exact: {{ include "mds.serverTlsName" . }}}
    {{- end }}
    load_assignment:
      cluster_name: mds
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address:
                address: {{ include "mds.fullname" . }}-server-headless.{{ .Release.Namespace }}.svc
                port_value: {{ .Values.server.grpcPort }}
  - name: mds_websocket  # the servers' WebSocket ports (MDS_WEBSOCKET_PORT), over HTTP/1.1
    type: STRICT_DNS
    dns_lookup_family: V4_PREFERRED
    dns_refresh_rate: 1s
    connect_timeout: 2s
    health_checks:
    - timeout: 1s
      interval: 1s
      no_traffic_interval: 1s
      unhealthy_threshold: 1
      healthy_threshold: 1
      # GET /health on the WebSocket port: 503 while the server drains or a backend is down, like gRPC health
      http_health_check: {path: /health}
    outlier_detection:
      split_external_local_origin_errors: true
      consecutive_local_origin_failure: 2
      enforcing_consecutive_local_origin_failure: 100
      enforcing_consecutive_5xx: 0
      enforcing_success_rate: 0
      interval: 1s
      base_ejection_time: 5s
      max_ejection_percent: 100
    {{- if .Values.tls.serverSecret }}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {{ include "mds.serverTlsName" . }}
        common_tls_context:
          alpn_protocols: [http/1.1]
          validation_context:
            trusted_ca: {filename: /etc/mds-server-tls/ca.crt}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {exact: {{ include "mds.serverTlsName" . }}}
    {{- end }}
    load_assignment:
      cluster_name: mds_websocket
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address:
                address: {{ include "mds.fullname" . }}-server-headless.{{ .Release.Namespace }}.svc
                port_value: {{ .Values.server.websocketPort }}
{{- end -}}

{{/* envoy.corsOrigins as a Lua table of allowed origins, as run_envoy.py writes it. */}}
{{- define "mds.luaOrigins" -}}
{{- $entries := list -}}
{{- range .Values.envoy.corsOrigins -}}
{{- $entries = append $entries (printf "[%q] = true" .) -}}
{{- end -}}
{{- printf "{%s}" (join ", " $entries) -}}
{{- end -}}

{{/* The gRPC paths of calls without side effects, which Envoy may retry on another server. */}}
{{- define "mds.retriablePaths" -}}
/mds[.]v1[.]InferenceService/(Predict|PredictStream)|/mds[.]v1[.]ModelService/(GetModel|ListModels|ListAliases|ListAliasHistory)|/mds[.]v1[.]JobService/(GetJob|ListJobs)|/inference[.]GRPCInferenceService/(ServerLive|ServerReady|ServerMetadata|ModelReady|ModelMetadata|ModelInfer|ModelStreamInfer)|/grpc[.]health[.]v1[.]Health/(Check)
{{- end -}}

{{- define "mds.serverTlsName" -}}
{{- .Values.tls.serverName | default (printf "%s-server.%s.svc" (include "mds.fullname" .) .Release.Namespace) -}}
{{- end -}}
