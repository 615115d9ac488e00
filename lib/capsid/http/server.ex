defmodule Capsid.HTTP.Server do
  @moduledoc """
  Serves a `wasi:http/proxy` component on a TCP port: each request goes to
  `Capsid.HTTP.handle/3`, and its answer goes back to the client. The
  HTTP/1.1 parser is Capsid's own and strict (see "Request framing"):
  whatever a proxy in front could read differently is refused before the
  component runs.

      children = [
        {Capsid.Deployment, name: :hello, component: "priv/guests/hello.wasm"},
        {Capsid.HTTP.Server, target: :hello, port: 8080}
      ]

      Supervisor.start_link(children, strategy: :rest_for_one)

  With `port: 0` the system picks a free port; `port/1` tells which:

      {:ok, server} = Capsid.HTTP.Server.start_link(target: :hello, port: 0)
      port = Capsid.HTTP.Server.port(server)
      #=> 41237

  The target is resolved again for every request, never cached: when it is
  a deployment, a hot swap (`Capsid.deploy/3` with a new version) changes
  what the port serves from the next request on, with no failed request.

  ## Options

    * `:target` (required) — what `Capsid.HTTP.handle/3` serves: a
      deployment name, or an instance's pid or name.
    * `:port` (required) — the TCP port; `0` picks a free one.
    * `:ip` — the address to listen on, default `{127, 0, 0, 1}` (loopback
      only); an IPv6 tuple, or `:any` for every IPv4 interface.
    * `:name` — registers the server, as `GenServer` names go.
    * `:max_body` — the largest request body in bytes, default 1 MiB
      (1_048_576). A larger request is answered 413, without calling the
      component. (The response's cap is `handle: [max_body: n]`: a
      component that writes more traps, and the client gets a 500.)
    * `:max_header_size` — the largest request header section in bytes,
      default 10_240; beyond it the answer is 431.
    * `:max_uri_size` — the longest request target in bytes, default 8_192;
      beyond it the answer is 414.
    * `:max_connections` — client connections open at once, default 150;
      one more is answered 503 and closed.
    * `:handle` — options for each `Capsid.HTTP.handle/3` call, e.g.
      `[timeout: 5_000, instance: :fresh]` (also `:fuel`, `:max_memory`,
      `:queue_timeout`, `:max_body`); default `[]`.

  A bad option raises `ArgumentError` naming it and what was expected.

  ## Requests

  The component sees the method, the path with its query (first normalized
  as RFC 3986 says: dot segments removed, percent-escapes of unreserved
  characters decoded; other percent-escapes are kept; an absolute-form
  target is cut to its path), the headers with lower-case names in the
  order they came, minus the hop-by-hop ones (`connection`, `keep-alive`,
  `te`, `transfer-encoding`, `upgrade`, `proxy-connection`, `expect`: the
  server already dealt with those), the body (a chunked one decoded), and
  the authority from the `Host` header; the `:scheme` is `:http`.

  The server answers some requests itself and never passes them on: 400
  for a malformed one (below), 501 for methods other than GET, HEAD, POST,
  PUT, PATCH, DELETE and TRACE (case-sensitive, as methods are), 505 for an
  HTTP version other than 1.0 and 1.1, 417 for an `Expect` other than
  `100-continue`, 408 for a request whose head and body take more than 60 s,
  and 413, 414 and 431 for the limits above. Each of these answers closes
  the connection.

  ## Request framing

  Two HTTP parsers that disagree on where a request ends let a client hide
  a request inside another one ("request smuggling", through a proxy in
  front of this server). So the server accepts only what RFC 9112 defines
  one way, and answers **400 and closes the connection, without calling the
  component**, for:

    * both `Content-Length` and `Transfer-Encoding`;
    * a `Transfer-Encoding` other than exactly `chunked` (any case) alone,
      also over several header lines (`gzip, chunked`, `chunked, chunked`,
      `identity`), or one in an HTTP/1.0 request;
    * a `Content-Length` that is not a plain decimal number (`+5`, `-1`,
      `0x10`, empty, more than 15 digits), or several that disagree (equal
      ones, also as `5, 5`, are one);
    * a header name with whitespace before its colon (`Transfer-Encoding :
      chunked`), or that is not a token, a line without a colon, a value
      with control characters;
    * a line starting with whitespace (obs-fold, a header continued on the
      next line), in the headers or a chunked body's trailers;
    * a CR or LF that is not part of a CRLF line ending;
    * an HTTP/1.1 request without exactly one `Host`;
    * a body shorter than its `Content-Length` when the client closes its
      side, a malformed chunked body (a bad size line, data not followed by
      CRLF), or a connection that ends inside a request.

  Bytes after a body of the announced length are the next request on the
  connection (pipelining), parsed by the same rules: a request cannot get
  past them by following another one. After a refused request nothing
  more is read from the connection.

  ## Responses

  The component's status, headers and body go back as they are, except
  that the server sets `content-length` itself (and drops the component's
  `content-length`, `transfer-encoding`, `connection`, `keep-alive`,
  `upgrade`, `proxy-connection`, `te` and `trailer`, and any header that is
  not a valid field); a response without `content-type` goes without one
  (httpd would otherwise add `text/html`). A HEAD request, a 204 and a 304
  get no body. When no answer comes from the component, the client gets a
  short plain-text body naming only the status, and the reason goes to
  `Logger` (metadata `capsid_server`, `capsid_path`; a refused request is
  logged at `:info`, without its bytes):

  | `Capsid.HTTP.handle/3` gives                                       | status | logged at  |
  |--------------------------------------------------------------------|--------|------------|
  | `%Capsid.Trap{kind: :timeout}`                                     | 504    | `:error`   |
  | another `%Capsid.Trap{}`                                           | 500    | `:error`   |
  | `%Capsid.Error{kind: :busy}` (with `retry-after: 1`)               | 503    | `:warning` |
  | `%Capsid.Error{}` of kind `:instance_down`, `:not_found`, `:resource_limit` | 503 | `:warning` |
  | `%Capsid.Error{kind: :timeout}` (a remote node did not answer)     | 504    | `:error`   |
  | another `%Capsid.Error{}` (e.g. not an HTTP component)             | 502    | `:error`   |
  | a 1xx status (not a final response)                                | 502    | `:error`   |
  | a raise, exit or throw                                             | 500    | `:error`   |

  503 means nothing can serve the request now (no deployment by that name,
  a full queue, a node limit): the client may retry. 502 means the target
  gave no usable response.

  Responses are HTTP/1.1; a connection stays open for the next request
  unless the request was HTTP/1.0 or said `connection: close`.

  Stopping the server closes the port and every connection. If its
  acceptor dies, the server exits too, so that its supervisor starts it
  again (with `port: 0`, on a new port).
  """

  use GenServer

  alias Capsid.HTTP.Server.{Connection, Handler}

  @keys [
    :target,
    :port,
    :ip,
    :name,
    :max_body,
    :max_header_size,
    :max_uri_size,
    :max_connections,
    :handle
  ]
  @defaults [
    ip: {127, 0, 0, 1},
    max_body: 1_048_576,
    max_header_size: 10_240,
    max_uri_size: 8_192,
    max_connections: 150,
    handle: []
  ]

  @type option ::
          {:target, term()}
          | {:port, :inet.port_number()}
          | {:ip, :inet.ip_address() | :any}
          | {:name, GenServer.name()}
          | {:max_body, pos_integer()}
          | {:max_header_size, pos_integer()}
          | {:max_uri_size, pos_integer()}
          | {:max_connections, pos_integer()}
          | {:handle, keyword()}

  @doc """
  A child spec: `{Capsid.HTTP.Server, target: :hello, port: 8080}`. Its id
  is `{Capsid.HTTP.Server, name}`, or `{Capsid.HTTP.Server, target}`
  without a `:name`.
  """
  @spec child_spec([option()]) :: Supervisor.child_spec()
  def child_spec(opts) do
    opts = validate!(opts)

    %{
      id: {__MODULE__, Keyword.get(opts, :name, opts[:target])},
      start: {__MODULE__, :start_link, [opts]},
      type: :worker,
      shutdown: 5_000
    }
  end

  @doc """
  Starts a server linked to the caller, listening once this returns.

  Bad options raise `ArgumentError`; a port that cannot be listened on
  gives `{:error, {:listen, reason}}` (e.g. `:eaddrinuse`).

      {:ok, server} = Capsid.HTTP.Server.start_link(target: :hello, port: 0)
  """
  @spec start_link([option()]) :: GenServer.on_start()
  def start_link(opts) do
    opts = validate!(opts)
    GenServer.start_link(__MODULE__, opts, Keyword.take(opts, [:name]))
  end

  @doc """
  The port the server listens on (the one the system picked for `port: 0`).

      Capsid.HTTP.Server.port(server)
      #=> 41237
  """
  @spec port(GenServer.server()) :: :inet.port_number()
  def port(server), do: GenServer.call(server, :port)

  ## Options

  defp validate!(opts) do
    Capsid.Options.validate!(opts, @keys, "Capsid.HTTP.Server")
    opts = Keyword.merge(@defaults, opts)

    unless Keyword.has_key?(opts, :target) do
      raise ArgumentError,
            "Capsid.HTTP.Server needs :target (a deployment name, or an instance's pid or name)"
    end

    port = Keyword.get(opts, :port)

    unless is_integer(port) and port in 0..65_535 do
      raise ArgumentError,
            "invalid value for :port: expected an integer in 0..65535 (0 picks a free port), " <>
              "got #{inspect(port)}"
    end

    unless ip?(opts[:ip]) do
      raise ArgumentError,
            "invalid value for :ip: expected an IP address tuple such as {127, 0, 0, 1} " <>
              "or {0, 0, 0, 0, 0, 0, 0, 1}, or :any, got #{inspect(opts[:ip])}"
    end

    for key <- [:max_body, :max_header_size, :max_uri_size, :max_connections] do
      value = opts[key]

      unless is_integer(value) and value > 0 do
        raise ArgumentError,
              "invalid value for #{inspect(key)}: expected a positive integer, " <>
                "got #{inspect(value)}"
      end
    end

    unless Keyword.keyword?(opts[:handle]) do
      raise ArgumentError,
            "invalid value for :handle: expected a keyword list of Capsid.HTTP.handle/3 " <>
              "options (e.g. [timeout: 5_000]), got #{inspect(opts[:handle])}"
    end

    opts
  end

  defp ip?(:any), do: true
  defp ip?(ip) when tuple_size(ip) in [4, 8], do: :inet.ntoa(ip) != {:error, :einval}
  defp ip?(_), do: false

  ## The server

  @impl true
  def init(opts) do
    # Connections are linked: their exits are counted, and they stop with
    # the server.
    Process.flag(:trap_exit, true)
    ip = opts[:ip]

    ip_opts =
      cond do
        ip == :any -> []
        ipv6?(ip) -> [:inet6, ip: ip]
        true -> [ip: ip]
      end

    # exit_on_close: false — a client that closed its side early still
    # reads the 400 its request earned. nodelay: a response is written in
    # one send; Nagle's algorithm would hold its last segment until the
    # client's delayed ACK (~40 ms per keep-alive request).
    listen_opts =
      [
        :binary,
        active: false,
        packet: :raw,
        reuseaddr: true,
        exit_on_close: false,
        nodelay: true,
        backlog: 1024
      ] ++ ip_opts

    case :gen_tcp.listen(opts[:port], listen_opts) do
      {:ok, listen} ->
        {:ok, port} = :inet.port(listen)
        server = self()
        acceptor = spawn_link(fn -> accept(listen, server) end)

        config = %{
          target: opts[:target],
          handle: opts[:handle],
          server: opts[:name] || self(),
          max_body: opts[:max_body],
          max_header_size: opts[:max_header_size],
          max_uri_size: opts[:max_uri_size]
        }

        {:ok,
         %{
           listen: listen,
           port: port,
           acceptor: acceptor,
           config: config,
           connections: MapSet.new(),
           max_connections: opts[:max_connections]
         }}

      {:error, reason} ->
        {:stop, {:listen, reason}}
    end
  end

  @impl true
  def handle_call(:port, _from, state), do: {:reply, state.port, state}

  @impl true
  def handle_info({:accepted, socket}, state) do
    if MapSet.size(state.connections) >= state.max_connections do
      # Busy: one short answer, never a component call.
      {status, headers, body} = Handler.plain(503)
      _ = :gen_tcp.send(socket, Handler.encode(status, headers, body, "GET", true))
      :gen_tcp.close(socket)
      {:noreply, state}
    else
      pid = Connection.start_link(state.config)

      case :gen_tcp.controlling_process(socket, pid) do
        :ok -> send(pid, {:socket, socket})
        {:error, _} -> :gen_tcp.close(socket)
      end

      {:noreply, %{state | connections: MapSet.put(state.connections, pid)}}
    end
  end

  def handle_info({:EXIT, acceptor, reason}, %{acceptor: acceptor} = state),
    do: {:stop, {:acceptor_down, reason}, state}

  def handle_info({:EXIT, pid, _reason}, state),
    do: {:noreply, %{state | connections: MapSet.delete(state.connections, pid)}}

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    :gen_tcp.close(state.listen)
    for pid <- state.connections, do: Process.exit(pid, :kill)
    :ok
  end

  # Accepts connections and hands each to the server, which starts its
  # process (and counts it).
  defp accept(listen, server) do
    case :gen_tcp.accept(listen) do
      {:ok, socket} ->
        case :gen_tcp.controlling_process(socket, server) do
          :ok -> send(server, {:accepted, socket})
          {:error, _} -> :gen_tcp.close(socket)
        end

        accept(listen, server)

      # Descriptors ran out: the next accept may work.
      {:error, reason} when reason in [:emfile, :enfile] ->
        Process.sleep(100)
        accept(listen, server)

      {:error, reason} ->
        exit({:accept, reason})
    end
  end

  defp ipv6?(ip), do: is_tuple(ip) and tuple_size(ip) == 8
end

defmodule Capsid.HTTP.Server.Handler do
  @moduledoc false
  # What `Capsid.HTTP.Server` answers to a well-formed request: the
  # component's response, or a short plain one when none came (see the
  # server's docs), and how a response is written on the wire.

  require Logger

  # Hop-by-hop headers: the server has already dealt with them (framing,
  # persistence, 100-continue), so they mean nothing past it.
  @request_hop_by_hop ~w(connection keep-alive proxy-connection te transfer-encoding upgrade expect)
  # The server frames the response itself (content-length) and manages the
  # connection.
  @response_dropped ~w(content-length transfer-encoding connection keep-alive proxy-connection upgrade te trailer)

  @phrases %{
    200 => "OK",
    201 => "Created",
    202 => "Accepted",
    204 => "No Content",
    206 => "Partial Content",
    301 => "Moved Permanently",
    302 => "Found",
    303 => "See Other",
    304 => "Not Modified",
    307 => "Temporary Redirect",
    308 => "Permanent Redirect",
    400 => "Bad Request",
    401 => "Unauthorized",
    403 => "Forbidden",
    404 => "Not Found",
    405 => "Method Not Allowed",
    408 => "Request Timeout",
    409 => "Conflict",
    410 => "Gone",
    413 => "Content Too Large",
    414 => "URI Too Long",
    415 => "Unsupported Media Type",
    417 => "Expectation Failed",
    422 => "Unprocessable Content",
    429 => "Too Many Requests",
    431 => "Request Header Fields Too Large",
    500 => "Internal Server Error",
    501 => "Not Implemented",
    502 => "Bad Gateway",
    503 => "Service Unavailable",
    504 => "Gateway Timeout",
    505 => "HTTP Version Not Supported"
  }

  @doc false
  # `{status, headers, body}` for a parsed request (`method`, `target`,
  # `path`, `headers`, `body`); never raises.
  def answer(config, raw) do
    answer(Capsid.HTTP.handle(config.target, request(raw), config.handle), config, raw)
  catch
    kind, reason ->
      log(:error, config, raw, Exception.format(kind, reason, __STACKTRACE__))
      plain(500)
  end

  @doc false
  # A request refused before the component: logged, its bytes are not.
  def refused(config, status, why) do
    Logger.info("Capsid.HTTP.Server #{inspect(config.server)}: refused with #{status}: #{why}",
      capsid_server: config.server
    )
  end

  ## The request

  defp request(raw) do
    headers = for {name, value} <- raw.headers, name not in @request_hop_by_hop, do: {name, value}
    request = %{method: raw.method, path: raw.path, headers: headers, body: raw.body, scheme: :http}

    case List.keyfind(headers, "host", 0) do
      {_, host} when host != "" -> Map.put(request, :authority, host)
      _ -> request
    end
  end

  @doc false
  # The path the component sees: origin-form, or absolute-form cut to its
  # path; normalized as RFC 3986 says.
  def path(target) do
    target =
      case target do
        "/" <> _ ->
          target

        _ ->
          case :uri_string.parse(target) do
            %{scheme: scheme} = uri when scheme in ["http", "HTTP"] ->
              path = if Map.get(uri, :path, "") == "", do: "/", else: uri.path
              if uri[:query], do: path <> "?" <> uri.query, else: path

            _ ->
              nil
          end
      end

    case target && :uri_string.normalize(target) do
      path when is_binary(path) -> {:ok, path}
      _ -> {:error, "a request target that is not a path (or an http URL)"}
    end
  end

  ## The answer

  defp answer({:ok, %{status: status}}, config, raw) when status in 100..199 do
    log(:error, config, raw, "the component answered #{status}, not a final status")
    plain(502)
  end

  defp answer({:ok, %{status: status, headers: headers, body: body}}, _config, _raw)
       when status in 200..999 do
    {status, headers, IO.iodata_to_binary(body)}
  end

  defp answer({:error, %Capsid.Trap{kind: kind} = trap}, config, raw) do
    log(:error, config, raw, "the component trapped: " <> Exception.message(trap))
    plain(if kind == :timeout, do: 504, else: 500)
  end

  defp answer({:error, %Capsid.Error{kind: :busy} = error}, config, raw) do
    log(:warning, config, raw, Exception.message(error))
    {status, headers, body} = plain(503)
    {status, [{"retry-after", "1"} | headers], body}
  end

  defp answer({:error, %Capsid.Error{kind: kind} = error}, config, raw)
       when kind in [:instance_down, :not_found, :resource_limit] do
    log(:warning, config, raw, Exception.message(error))
    plain(503)
  end

  defp answer({:error, %Capsid.Error{kind: :timeout} = error}, config, raw) do
    log(:error, config, raw, Exception.message(error))
    plain(504)
  end

  defp answer({:error, %Capsid.Error{} = error}, config, raw) do
    log(:error, config, raw, Exception.message(error))
    plain(502)
  end

  defp answer(other, config, raw) do
    log(:error, config, raw, "unexpected answer: #{inspect(other, limit: 20)}")
    plain(500)
  end

  @doc false
  # Only the status, never what went wrong inside: that is in the log.
  def plain(status) do
    {status, [{"content-type", "text/plain; charset=utf-8"}], "#{status} #{@phrases[status]}\n"}
  end

  defp log(level, config, raw, message) do
    Logger.log(
      level,
      "Capsid.HTTP.Server #{inspect(config.server)}: #{raw.method} #{raw.target}: #{message}",
      capsid_server: config.server,
      capsid_path: raw.target
    )
  end

  ## The response on the wire

  @doc false
  # The response's bytes. A bad header or body from the component (not
  # binaries) makes it a plain 500.
  def encode(status, headers, body, method, close?) do
    try do
      head = head(status, headers, body, method, close?)
      [head, if(status in [204, 304] or method == "HEAD", do: [], else: body)]
    rescue
      _ ->
        {status, headers, body} = plain(500)
        encode(status, headers, body, method, close?)
    end
  end

  defp head(status, headers, body, method, close?) do
    headers =
      for {name, value} <- headers,
          name = String.downcase(name, :ascii),
          name not in @response_dropped,
          field?(name, value),
          do: [name, ": ", value, "\r\n"]

    length =
      cond do
        status in [204, 304] -> []
        # A HEAD response tells the length a GET would have.
        method == "HEAD" and body == "" -> []
        true -> ["content-length: ", Integer.to_string(IO.iodata_length(body)), "\r\n"]
      end

    connection = if close?, do: "connection: close\r\n", else: []

    IO.iodata_to_binary([
      "HTTP/1.1 ",
      Integer.to_string(status),
      " ",
      Map.get(@phrases, status, ""),
      "\r\n",
      headers,
      length,
      connection,
      "\r\n"
    ])
  end

  # A field name is a token; a value has no CR, LF or NUL (that would split
  # the response).
  defp field?(name, value) when is_binary(name) and is_binary(value) do
    name =~ ~r/\A[!#$%&'*+\-.^_`|~0-9a-z]+\z/ and not String.contains?(value, ["\r", "\n", <<0>>])
  end

  defp field?(_name, _value), do: false
end
