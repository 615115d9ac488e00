defmodule Capsid.HTTP.Server do
  @moduledoc """
  Serves a `wasi:http/proxy` component on a TCP port, on OTP's own HTTP
  server (`:inets` httpd): each request goes to `Capsid.HTTP.handle/3`, and
  its answer goes back to the client.

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

  `:inets` must be running (or at least loadable): add it to
  `extra_applications` in your `mix.exs`.

  ## Options

    * `:target` (required) — what `Capsid.HTTP.handle/3` serves: a
      deployment name, or an instance's pid or name.
    * `:port` (required) — the TCP port; `0` picks a free one.
    * `:ip` — the address to listen on, default `{127, 0, 0, 1}` (loopback
      only); an IPv6 tuple, or `:any` for every IPv4 interface.
    * `:name` — registers the server, as `GenServer` names go.
    * `:max_body` — the largest request body in bytes, default 1 MiB
      (1_048_576). A larger request is answered 413 by httpd, without
      calling the component. (The response's cap is `handle: [max_body: n]`:
      a component that writes more traps, and the client gets a 500.)
    * `:max_header_size` — the largest request header section in bytes,
      default 10_240; beyond it httpd answers 413.
    * `:max_uri_size` — the longest request URI in bytes, default 8_192;
      beyond it httpd answers 414.
    * `:handle` — options for each `Capsid.HTTP.handle/3` call, e.g.
      `[timeout: 5_000, instance: :fresh]` (also `:fuel`, `:max_memory`,
      `:queue_timeout`, `:max_body`); default `[]`.

  A bad option raises `ArgumentError` naming it and what was expected.

  ## Requests

  The component sees the method (upper case), the path with its query as
  httpd received it (httpd first normalizes it as RFC 3986 says: dot
  segments removed, percent-escapes of unreserved characters decoded; other
  percent-escapes are kept), the headers with lower-case names in the order
  they came, minus the hop-by-hop ones (`connection`, `keep-alive`, `te`,
  `transfer-encoding`, `upgrade`, `proxy-connection`, `expect`: httpd
  already dealt with those), the body (a chunked one decoded), and the
  authority from the `Host` header; the `:scheme` is `:http`. httpd answers
  some requests itself and never passes them on: 400 for a malformed one,
  501 for methods other than GET, HEAD, POST, PUT, PATCH, DELETE and TRACE,
  413 and 414 for the limits above.

  ## Responses

  The component's status, headers and body go back as they are, except
  that the server sets `content-length` itself (and drops the component's
  `content-length`, `transfer-encoding`, `connection`, `keep-alive`,
  `upgrade`, `proxy-connection`, `te` and `trailer`, and any header that is
  not a valid field); a response without `content-type` goes without one
  (httpd would otherwise add `text/html`). A HEAD request, a 204 and a 304
  get no body. When no answer comes from the component, the client gets a
  short plain-text body naming only the status, and the reason goes to
  `Logger` (metadata `capsid_server`, `capsid_path`):

  | `Capsid.HTTP.handle/3` gives                                       | status | logged at  |
  |--------------------------------------------------------------------|--------|------------|
  | `%Capsid.Trap{kind: :timeout}`                                     | 504    | `:error`   |
  | another `%Capsid.Trap{}`                                           | 500    | `:error`   |
  | `%Capsid.Error{kind: :busy}` (with `retry-after: 1`)               | 503    | `:warning` |
  | `%Capsid.Error{}` of kind `:instance_down`, `:not_found`, `:resource_limit` | 503 | `:warning` |
  | another `%Capsid.Error{}` (e.g. not an HTTP component)             | 502    | `:error`   |
  | a 1xx status (not a final response)                                | 502    | `:error`   |
  | a raise, exit or throw                                             | 500    | `:error`   |

  503 means nothing can serve the request now (no deployment by that name,
  a full queue, a node limit): the client may retry. 502 means the target
  gave no usable response.

  Stopping the server stops httpd and closes the port. If httpd dies, the
  server exits too, so that its supervisor starts both again (with
  `port: 0`, on a new port).
  """

  use GenServer

  @keys [:target, :port, :ip, :name, :max_body, :max_header_size, :max_uri_size, :handle]
  @defaults [
    ip: {127, 0, 0, 1},
    max_body: 1_048_576,
    max_header_size: 10_240,
    max_uri_size: 8_192,
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
      # terminate/2 waits up to 5 s for httpd to stop.
      shutdown: 10_000
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

    for key <- [:max_body, :max_header_size, :max_uri_size] do
      value = opts[key]

      unless is_integer(value) and value > 0 do
        raise ArgumentError,
              "invalid value for #{inspect(key)}: expected a positive integer (bytes), " <>
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
    # terminate/2 must run when the supervisor stops us, to stop httpd.
    Process.flag(:trap_exit, true)

    case :inets.start(:httpd, httpd_config(opts), :stand_alone) do
      {:ok, httpd} ->
        case bound_port(httpd) do
          {:ok, port} ->
            {:ok, %{httpd: httpd, port: port}}

          :error ->
            stop_httpd(httpd)
            {:stop, {:listen, listen_error(opts[:ip], opts[:port])}}
        end

      {:error, reason} ->
        {:stop, {:listen, listen_error(opts[:ip], opts[:port], reason)}}
    end
  end

  @impl true
  def handle_call(:port, _from, state), do: {:reply, state.port, state}

  @impl true
  def handle_info({:EXIT, httpd, reason}, %{httpd: httpd} = state),
    do: {:stop, {:httpd_down, reason}, %{state | httpd: nil}}

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, %{httpd: httpd}) when is_pid(httpd), do: stop_httpd(httpd)
  def terminate(_reason, _state), do: :ok

  defp httpd_config(opts) do
    ip = opts[:ip]
    # httpd needs both directories to exist; nothing is read from them or
    # written there, since the only module is the handler below.
    root = String.to_charlist(System.tmp_dir!())

    [
      # A custom property: httpd keeps every entry of its configuration in
      # its config table, which the handler reads for each request.
      {__MODULE__.Handler,
       %{target: opts[:target], handle: opts[:handle], server: opts[:name] || self()}},
      port: opts[:port],
      bind_address: ip,
      ipfamily: if(ipv6?(ip), do: :inet6, else: :inet),
      server_name: ~c"capsid",
      server_root: root,
      document_root: root,
      # No Server header advertising the inets version; a component may
      # send its own.
      server_tokens: :none,
      modules: [__MODULE__.Handler],
      customize: __MODULE__.Handler,
      max_body_size: opts[:max_body],
      max_header_size: opts[:max_header_size],
      max_uri_size: opts[:max_uri_size]
    ]
  end

  defp ipv6?(ip), do: is_tuple(ip) and tuple_size(ip) == 8

  # A stand-alone httpd cannot be asked for its port (`:httpd.info/1` looks
  # only in inets' own supervisor), but its one child, the instance
  # supervisor, is named after the port it listens on, as httpd fills in
  # the port the system picked for 0. No child: it failed to listen.
  defp bound_port(httpd) do
    Enum.find_value(Supervisor.which_children(httpd), :error, fn
      {{:httpd_instance_sup, _ip, port, _profile}, _, _, _} when is_integer(port) -> {:ok, port}
      _ -> nil
    end)
  end

  # httpd logs why it could not listen but does not return it for port 0;
  # trying once ourselves gives the reason (:eaddrinuse, :eaddrnotavail...).
  defp listen_error(ip, port, reason \\ nil) do
    ip_opts =
      cond do
        ip == :any -> []
        ipv6?(ip) -> [:inet6, ip: ip]
        true -> [ip: ip]
      end

    case :gen_tcp.listen(port, [:binary, active: false] ++ ip_opts) do
      {:ok, socket} ->
        :gen_tcp.close(socket)
        reason || :unknown

      {:error, posix} ->
        posix
    end
  end

  defp stop_httpd(httpd) do
    ref = Process.monitor(httpd)
    Process.exit(httpd, :shutdown)

    receive do
      {:DOWN, ^ref, _, _, _} -> :ok
    after
      5_000 ->
        Process.exit(httpd, :kill)

        receive do
          {:DOWN, ^ref, _, _, _} -> :ok
        end
    end
  end
end

defmodule Capsid.HTTP.Server.Handler do
  @moduledoc false
  # httpd's callback module for `Capsid.HTTP.Server`, called in httpd's
  # process for the connection: `do/1` answers a request (the "Erlang Web
  # Server API" of httpd), and `response_header/1` (httpd's `customize`
  # behaviour, `httpd_custom_api`) drops the content-type httpd adds by
  # default to a response that has none.

  require Logger
  require Record

  @behaviour :httpd_custom_api

  Record.defrecordp(:mod, Record.extract(:mod, from_lib: "inets/include/httpd.hrl"))

  # Given as the value of content-type when the component sent none:
  # response_header/1 drops it. httpd adds `content-type: text/html` to a
  # response without one, unless it is already there. (An empty
  # content-type is not a media type; dropping one is no loss.)
  @no_content_type ~c""

  # Hop-by-hop headers: httpd has already dealt with them (framing,
  # persistence, 100-continue), so they mean nothing past it.
  @request_hop_by_hop ~w(connection keep-alive proxy-connection te transfer-encoding upgrade expect)
  # The server frames the response itself (content-length) and httpd
  # manages the connection.
  @response_dropped ~w(content-length transfer-encoding connection keep-alive proxy-connection upgrade te trailer)

  @phrases %{
    500 => "Internal Server Error",
    502 => "Bad Gateway",
    503 => "Service Unavailable",
    504 => "Gateway Timeout"
  }

  @doc false
  def unquote(:do)(mod_data) do
    config = config(mod_data)
    method = mod(mod_data, :method)

    {status, headers, body} =
      try do
        request = request(mod_data)
        answer(Capsid.HTTP.handle(config.target, request, config.handle), mod_data, config)
      catch
        kind, reason ->
          log(:error, config, mod_data, Exception.format(kind, reason, __STACKTRACE__))
          plain(500)
      end

    response =
      try do
        {:response, head(status, headers, body, method), body(status, body, method)}
      catch
        kind, reason ->
          # The component's headers or body were not binaries.
          log(:error, config, mod_data, Exception.format(kind, reason, __STACKTRACE__))
          {status, headers, body} = plain(500)
          {:response, head(status, headers, body, method), body(status, body, method)}
      end

    {:proceed, [response: response]}
  end

  @impl :httpd_custom_api
  def response_header({~c"content-type", @no_content_type}), do: false
  def response_header(header), do: {true, header}

  @impl :httpd_custom_api
  def request_header(header), do: {true, header}

  @impl :httpd_custom_api
  def response_default_headers, do: []

  defp config(mod_data) do
    [{_, config} | _] = :ets.lookup(mod(mod_data, :config_db), __MODULE__)
    config
  end

  ## The request

  defp request(mod_data) do
    # httpd gives headers in the reverse of the order they came.
    headers =
      for {name, value} <- Enum.reverse(mod(mod_data, :parsed_header)),
          name = :erlang.list_to_binary(name) |> String.downcase(:ascii),
          name not in @request_hop_by_hop,
          do: {name, :erlang.list_to_binary(value)}

    request = %{
      method: mod(mod_data, :method) |> :erlang.list_to_binary() |> String.upcase(:ascii),
      path: :erlang.list_to_binary(mod(mod_data, :request_uri)),
      headers: headers,
      # A binary, or the bytes as a list on a kept-alive connection.
      body: IO.iodata_to_binary(mod(mod_data, :entity_body)),
      scheme: :http
    }

    case List.keyfind(headers, "host", 0) do
      {_, host} when host != "" -> Map.put(request, :authority, host)
      _ -> request
    end
  end

  ## The answer

  defp answer({:ok, %{status: status}}, mod_data, config) when status in 100..199 do
    log(:error, config, mod_data, "the component answered #{status}, not a final status")
    plain(502)
  end

  defp answer({:ok, %{status: status, headers: headers, body: body}}, _mod_data, _config)
       when status in 200..999 do
    {status, headers, IO.iodata_to_binary(body)}
  end

  defp answer({:error, %Capsid.Trap{kind: kind} = trap}, mod_data, config) do
    log(:error, config, mod_data, "the component trapped: " <> Exception.message(trap))
    plain(if kind == :timeout, do: 504, else: 500)
  end

  defp answer({:error, %Capsid.Error{kind: :busy} = error}, mod_data, config) do
    log(:warning, config, mod_data, Exception.message(error))
    {status, headers, body} = plain(503)
    {status, [{"retry-after", "1"} | headers], body}
  end

  defp answer({:error, %Capsid.Error{kind: kind} = error}, mod_data, config)
       when kind in [:instance_down, :not_found, :resource_limit] do
    log(:warning, config, mod_data, Exception.message(error))
    plain(503)
  end

  defp answer({:error, %Capsid.Error{} = error}, mod_data, config) do
    log(:error, config, mod_data, Exception.message(error))
    plain(502)
  end

  defp answer(other, mod_data, config) do
    log(:error, config, mod_data, "unexpected answer: #{inspect(other, limit: 20)}")
    plain(500)
  end

  # Only the status, never what went wrong inside: that is in the log.
  defp plain(status) do
    {status, [{"content-type", "text/plain; charset=utf-8"}], "#{status} #{@phrases[status]}\n"}
  end

  defp log(level, config, mod_data, message) do
    path = :erlang.list_to_binary(mod(mod_data, :request_uri))

    Logger.log(
      level,
      "Capsid.HTTP.Server #{inspect(config.server)}: #{mod(mod_data, :method)} #{path}: #{message}",
      capsid_server: config.server,
      capsid_path: path
    )
  end

  # The status line's head, as httpd takes it: `code`, `content_length`,
  # then the other headers as {name, value} charlists.
  defp head(status, headers, body, method) do
    headers =
      for {name, value} <- headers,
          name = String.downcase(name, :ascii),
          name not in @response_dropped,
          field?(name, value),
          do: {String.to_charlist(name), :erlang.binary_to_list(value)}

    headers =
      if List.keymember?(headers, ~c"content-type", 0),
        do: headers,
        else: [{~c"content-type", @no_content_type} | headers]

    length =
      cond do
        status in [204, 304] -> []
        # A HEAD response tells the length a GET would have.
        method == ~c"HEAD" and body == "" -> []
        true -> [content_length: Integer.to_charlist(byte_size(body))]
      end

    [code: status] ++ length ++ headers
  end

  defp body(status, body, method) do
    if status in [204, 304] or method == ~c"HEAD", do: [], else: [body]
  end

  # A field name is a token; a value has no CR, LF or NUL (that would split
  # the response).
  defp field?(name, value) when is_binary(name) and is_binary(value) do
    name =~ ~r/\A[!#$%&'*+\-.^_`|~0-9a-z]+\z/ and not String.contains?(value, ["\r", "\n", <<0>>])
  end

  defp field?(_name, _value), do: false
end
