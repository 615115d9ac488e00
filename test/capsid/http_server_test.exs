defmodule Capsid.HTTP.ServerTest do
  @moduledoc """
  `Capsid.HTTP.Server` serving the componentize-js fixtures
  (test/fixtures/foreign/http_js/README.md), with `:httpc` as the client.
  Each test deploys its own copy of `http_v1.wasm` (from the compile cache)
  and serves it on a free port of 127.0.0.1.
  """
  use ExUnit.Case, async: true

  import Capsid.TestHelpers
  import ExUnit.CaptureLog

  alias Capsid.HTTP.Server

  @moduletag timeout: 300_000

  @v1 Path.expand("../fixtures/foreign/http_js/http_v1.wasm", __DIR__)
  @v2 Path.expand("../fixtures/foreign/http_js/http_v2.wasm", __DIR__)

  setup_all do
    {:ok, _} = Application.ensure_all_started(:inets)

    # ~13 MB of SpiderMonkey each, 20-40 s to compile: done once, so that
    # every deploy below loads them from the cache. One at a time: other
    # modules' big fixtures need compile slots too.
    Enum.each([@v1, @v2], &Capsid.Component.load!/1)

    :ok
  end

  # Tags: `deploy:` options for the deployment, `server:` for the server;
  # `stderr_to_test:` sends the guest's stderr to the test process;
  # `silent_upstream:` opens a port that accepts connections and never
  # answers (`upstream`), and lets the guest fetch from it.
  setup context do
    name = :"http_server_#{context.line}_#{System.unique_integer([:positive])}"

    {wasi, upstream} =
      if context[:silent_upstream] do
        # Owned by the test process: it listens until the test ends.
        {:ok, socket} = :gen_tcp.listen(0, ip: {127, 0, 0, 1}, active: false)
        {:ok, port} = :inet.port(socket)
        {[http: [allow: ["127.0.0.1:#{port}"]]], port}
      else
        {[], nil}
      end

    wasi = if context[:stderr_to_test], do: [stderr: {:send, self()}] ++ wasi, else: wasi

    deploy_opts =
      [size: 1] ++ Map.get(context, :deploy, []) ++ if(wasi != [], do: [wasi: wasi], else: [])

    {:ok, _} = Capsid.deploy(name, @v1, deploy_opts)
    on_exit(fn -> Capsid.undeploy(name) end)

    server = start_supervised!({Server, [target: name, port: 0] ++ Map.get(context, :server, [])})

    %{
      name: name,
      server: server,
      url: "http://127.0.0.1:#{Server.port(server)}",
      upstream: upstream
    }
  end

  # `{status, headers, body}`: header names in lower case, several values
  # of one name kept apart.
  defp request(method, url, headers \\ [], body \\ nil) do
    headers = for {k, v} <- headers, do: {to_charlist(k), to_charlist(v)}

    request =
      if body,
        do: {to_charlist(url), headers, ~c"application/octet-stream", body},
        else: {to_charlist(url), headers}

    {:ok, {{_, status, _}, headers, body}} =
      :httpc.request(method, request, [timeout: 60_000], body_format: :binary)

    {status, for({k, v} <- headers, do: {String.downcase(to_string(k)), to_string(v)}), body}
  end

  defp header(headers, name), do: for({^name, v} <- headers, do: v)

  # Sends raw bytes on a fresh connection (then closes its sending side if
  # `half_close`) and reads until the server closes: `{:closed, bytes}`, or
  # `{:open, bytes}` if it kept the connection open for 2 s.
  defp raw(url, bytes, half_close \\ false) do
    %URI{port: port} = URI.parse(url)
    {:ok, socket} = :gen_tcp.connect({127, 0, 0, 1}, port, [:binary, active: false])
    :ok = :gen_tcp.send(socket, bytes)
    if half_close, do: :ok = :gen_tcp.shutdown(socket, :write)
    read_all(socket, "")
  end

  defp read_all(socket, acc) do
    case :gen_tcp.recv(socket, 0, 2_000) do
      {:ok, data} -> read_all(socket, acc <> data)
      {:error, :timeout} -> :gen_tcp.close(socket) && {:open, acc}
      {:error, _} -> {:closed, acc}
    end
  end

  # Counts the component's calls for this test's deployment.
  defp count_calls(name) do
    test = self()
    id = {:http_calls, make_ref()}

    :telemetry.attach(
      id,
      [:capsid, :call, :start],
      fn _, _, %{instance: instance}, _ ->
        if instance == name, do: send(test, :component_called)
      end,
      nil
    )

    on_exit(fn -> :telemetry.detach(id) end)
  end

  defp calls do
    receive do
      :component_called -> 1 + calls()
    after
      200 -> 0
    end
  end

  test "port: 0 picks a free port, which port/1 returns", %{name: name, server: server, url: url} do
    port = Server.port(server)
    assert port in 1..65_535
    assert url == "http://127.0.0.1:#{port}"

    # By name, on another port.
    server_name = :"#{name}_server"
    start_supervised!({Server, target: name, port: 0, name: server_name})
    other = Server.port(server_name)
    assert other != port
    assert {200, _, "hello from js v1"} = request(:get, "http://127.0.0.1:#{other}/")
  end

  test "GET / answers with the component's status, headers and body", %{url: url} do
    assert {200, headers, "hello from js v1"} = request(:get, url <> "/")
    # The component's content-type, once, not httpd's text/html beside it.
    assert header(headers, "content-type") == ["text/plain"]
    assert header(headers, "content-length") == ["16"]
  end

  test "POST /echo: a binary body, the path with its query, a custom header", %{url: url} do
    body = :binary.list_to_bin(Enum.to_list(0..255)) |> String.duplicate(4)

    assert {200, headers, ^body} =
             request(:post, url <> "/echo/x?y=1&z=%20", [{"x-agent", "capsid-test"}], body)

    assert header(headers, "x-method") == ["POST"]
    assert header(headers, "x-path") == ["/echo/x?y=1&z=%20"]
    assert header(headers, "x-agent-seen") == ["capsid-test"]
    assert header(headers, "content-length") == ["1024"]
    # The component sends none; httpd must not add its default one.
    assert header(headers, "content-type") == []

    assert {200, headers, ""} = request(:get, url <> "/echo")
    assert header(headers, "x-method") == ["GET"]
    assert header(headers, "x-agent-seen") == ["none"]
  end

  test "an unknown route is the component's 404", %{url: url} do
    assert {404, headers, "not found"} = request(:get, url <> "/nope")
    assert header(headers, "content-type") == ["text/plain"]
    assert {404, _, "not found"} = request(:post, url <> "/", [], "x")
  end

  @tag deploy: [wasi: [stderr: {:logger, :error}]]
  test "/boom: the component's own 500, its error in the log", %{url: url} do
    log =
      capture_log(fn ->
        assert {500, _headers, ""} = request(:get, url <> "/boom")
      end)

    assert log =~ "boom from js v1"
  end

  # GET / takes about 275k fuel (the fixtures' README): this traps.
  @tag server: [handle: [fuel: 50_000]]
  test "a trap is a 500 with a short body; the trap is logged with the path", %{url: url} do
    log =
      capture_log(fn ->
        assert {500, headers, body} = request(:get, url <> "/?q=1")
        assert body == "500 Internal Server Error\n"
        assert header(headers, "content-type") == ["text/plain; charset=utf-8"]
      end)

    assert log =~ "[error]"
    assert log =~ "out_of_fuel"
    assert log =~ "GET /?q=1"
  end

  # The guest's fetch() waits for an upstream that never answers, until the
  # call's timeout.
  @tag silent_upstream: true, server: [handle: [timeout: 500]]
  test "a timeout is a 504", %{url: url, upstream: upstream} do
    target = URI.encode_www_form("http://127.0.0.1:#{upstream}/")

    log =
      capture_log(fn ->
        assert {504, _, "504 Gateway Timeout\n"} = request(:get, url <> "/fetch?url=" <> target)
      end)

    assert log =~ "[error]"
    assert log =~ "timeout"
  end

  test "no deployment behind the name: 503, and it serves again once deployed",
       %{name: name, url: url} do
    :ok = Capsid.undeploy(name)

    log =
      capture_log(fn ->
        assert {503, _, "503 Service Unavailable\n"} = request(:get, url <> "/")
      end)

    assert log =~ "[warning]"
    assert log =~ "GET /"

    {:ok, _} = Capsid.deploy(name, @v1, size: 1)
    assert {200, _, "hello from js v1"} = request(:get, url <> "/")
  end

  @tag server: [max_body: 1_000], stderr_to_test: true
  test "a body over :max_body is refused with 413 and never reaches the component",
       %{url: url} do
    assert {413, _, _} =
             request(:post, url <> "/boom", [{"connection", "close"}], :binary.copy("a", 1_001))

    refute_receive {:capsid_output, _, :stderr, _}, 500

    # At the limit it goes through: /boom writes to stderr.
    assert {500, _, ""} = request(:post, url <> "/boom", [], :binary.copy("a", 1_000))
    assert_receive {:capsid_output, _, :stderr, stderr}, 5_000
    assert stderr =~ "boom from js v1"
  end

  @tag server: [max_header_size: 1_024]
  test "headers over :max_header_size are refused with a 4xx", %{url: url} do
    assert {status, _, _} =
             request(:get, url <> "/echo", [
               {"connection", "close"},
               {"x-agent", String.duplicate("a", 2_000)}
             ])

    assert status in 400..499

    assert {200, headers, _} = request(:get, url <> "/echo", [{"x-agent", "short"}])
    assert header(headers, "x-agent-seen") == ["short"]
  end

  describe "request smuggling shapes are refused with 400 before the component runs" do
    setup %{name: name} do
      count_calls(name)
      :ok
    end

    @shapes [
      "both Content-Length and Transfer-Encoding":
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
      "Transfer-Encoding with a space before the colon":
        "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
      "Transfer-Encoding with a tab before the colon":
        "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding\t: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
      "another header with a space before the colon":
        "GET /echo HTTP/1.1\r\nHost: a\r\nX-Agent : x\r\n\r\n",
      "Content-Length with a space before the colon":
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\nhello",
      "two Content-Lengths that disagree":
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
      "a Content-Length list that disagrees":
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\nhello!",
      "a non-numeric Content-Length":
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\nhello",
      "a negative Content-Length":
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\nhello",
      "a signed Content-Length":
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
      "Transfer-Encoding gzip":
        "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n",
      "Transfer-Encoding with chunked not alone":
        "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
      "Transfer-Encoding chunked twice over two lines":
        "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
      "Transfer-Encoding with chunked not final":
        "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
      "an obs-fold continuation line": "GET /echo HTTP/1.1\r\nHost: a\r\nX-Agent: a\r\n b\r\n\r\n",
      "an obs-fold line that looks like Transfer-Encoding":
        "POST /echo HTTP/1.1\r\nHost: a\r\nX-Agent: a\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
      "bare LF line endings": "GET /echo HTTP/1.1\nHost: a\nX-Agent: a\n\n",
      "a header line without a colon": "GET /echo HTTP/1.1\r\nHost: a\r\nX-Agent\r\n\r\n",
      "a chunk not followed by CRLF":
        "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
      "an HTTP/1.1 request without Host": "GET /echo HTTP/1.1\r\nX-Agent: a\r\n\r\n",
      "a smuggled request in a refused request's body":
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n" <>
          "0\r\n\r\nGET /echo HTTP/1.1\r\nHost: a\r\n\r\n"
    ]

    for {shape, bytes} <- @shapes do
      @bytes bytes
      test "#{shape}", %{url: url} do
        assert {:closed, response} = raw(url, @bytes)
        assert response =~ ~r/\AHTTP\/1\.1 400 /
        # One response, and nothing after it: the connection is closed.
        assert length(String.split(response, "HTTP/1.1 ")) == 2
        assert calls() == 0
      end
    end

    test "a body shorter than its Content-Length, then the client closes", %{url: url} do
      bytes = "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc"
      assert {:closed, response} = raw(url, bytes, true)
      assert response =~ ~r/\AHTTP\/1\.1 400 /
      assert calls() == 0
    end

    test "a bad request after a good one on the same connection (pipelined leftover)",
         %{url: url} do
      bytes =
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello" <>
          "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc"

      assert {:closed, response} = raw(url, bytes)
      assert [_, first, second] = String.split(response, "HTTP/1.1 ")
      assert first =~ ~r/\A200 .*hello\z/s
      assert second =~ ~r/\A400 /
      # The first request only.
      assert calls() == 1
    end

    test "well-formed requests still go through: chunked, pipelined, kept alive", %{url: url} do
      bytes =
        "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n" <>
          "3;ext=1\r\nhel\r\n2\r\nlo\r\n0\r\nX-Trailer: t\r\n\r\n" <>
          "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nworld" <>
          "GET /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"

      assert {:closed, response} = raw(url, bytes)
      assert [_, first, second, third] = String.split(response, "HTTP/1.1 ")
      assert first =~ ~r/\A200 .*x-method: POST.*\r\n\r\nhello\z/s
      assert second =~ ~r/\A200 .*\r\n\r\nworld\z/s
      assert third =~ ~r/\A200 .*connection: close/s
      assert calls() == 3
    end
  end

  @tag server: [max_connections: 2]
  test "connections beyond :max_connections get a 503 and are closed", %{url: url} do
    %URI{port: port} = URI.parse(url)

    open =
      for _ <- 1..2, do: elem(:gen_tcp.connect({127, 0, 0, 1}, port, [:binary, active: false]), 1)

    # The server has counted both once the third is answered.
    Process.sleep(100)
    assert {:closed, response} = raw(url, "GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response =~ ~r/\AHTTP\/1\.1 503 /
    Enum.each(open, &:gen_tcp.close/1)

    Capsid.TestHelpers.wait_until(
      fn -> match?({:closed, "HTTP/1.1 200 " <> _}, raw(url, "GET / HTTP/1.0\r\n\r\n")) end,
      5_000
    )
  end

  test "100 requests in a row, each on a fresh instance", %{url: url} do
    for i <- 1..100 do
      assert {200, _, "hello from js v1"} = request(:get, url <> "/"), "request #{i}"
    end
  end

  test "a hot swap changes what the port serves, with no failed request",
       %{name: name, url: url} do
    # [requests answered, of which by v2]
    seen = :counters.new(2, [])

    stop =
      in_background([], 0, fn acc ->
        {_, _, body} = response = request(:get, url <> "/")
        :counters.add(seen, 1, 1)
        if body == "hello from js v2", do: :counters.add(seen, 2, 1)
        [response | acc]
      end)

    wait_until(fn -> :counters.get(seen, 1) >= 5 end)
    {:ok, _} = Capsid.deploy(name, @v2)
    wait_until(fn -> :counters.get(seen, 2) >= 5 end)

    results = Enum.reverse(stop.())
    failed = Enum.reject(results, &match?({200, _, _}, &1))
    assert failed == []

    bodies = Enum.map(results, fn {_, _, body} -> body end)
    {before, later} = Enum.split_while(bodies, &(&1 == "hello from js v1"))
    assert length(before) >= 5
    # One client, one request at a time: once v2 has answered, v1 never does.
    assert Enum.uniq(later) == ["hello from js v2"]
  end

  test "stopping the server closes the port and its connections",
       %{name: name, server: server, url: url} do
    port = Server.port(server)
    assert {200, _, _} = request(:get, url <> "/")
    {:ok, idle} = :gen_tcp.connect({127, 0, 0, 1}, port, [:binary, active: false])

    :ok = stop_supervised({Server, name})
    # The idle connection is closed with the server.
    assert {:error, :closed} = :gen_tcp.recv(idle, 0, 5_000)
    # A connection racing the close may be reset rather than refused, but
    # none is ever served again.
    Capsid.TestHelpers.wait_until(
      fn -> :gen_tcp.connect({127, 0, 0, 1}, port, []) == {:error, :econnrefused} end,
      5_000
    )
  end

  test "bad options raise ArgumentError naming the option" do
    assert_raise ArgumentError, ~r/needs :target/, fn -> Server.start_link(port: 0) end

    assert_raise ArgumentError, ~r/invalid value for :port/, fn ->
      Server.start_link(target: :x, port: 70_000)
    end

    assert_raise ArgumentError, ~r/invalid value for :port/, fn -> Server.start_link(target: :x) end

    assert_raise ArgumentError, ~r/invalid value for :ip/, fn ->
      Server.start_link(target: :x, port: 0, ip: "127.0.0.1")
    end

    assert_raise ArgumentError, ~r/invalid value for :max_body/, fn ->
      Server.start_link(target: :x, port: 0, max_body: 0)
    end

    assert_raise ArgumentError, ~r/invalid value for :handle/, fn ->
      Server.child_spec(target: :x, port: 0, handle: :fresh)
    end

    assert_raise ArgumentError, ~r/unknown option :prot .*Did you mean :port\?/, fn ->
      Server.start_link(target: :x, prot: 0)
    end
  end

  test "a port in use is an error, not a crash", %{server: server} do
    Process.flag(:trap_exit, true)
    port = Server.port(server)

    capture_log(fn ->
      assert {:error, {:listen, :eaddrinuse}} = Server.start_link(target: :x, port: port)
    end)
  end
end
