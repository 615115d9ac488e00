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

  test "stopping the server stops httpd and closes the port",
       %{name: name, server: server, url: url} do
    port = Server.port(server)
    assert {200, _, _} = request(:get, url <> "/")

    # httpd's stand-alone supervisor, linked to the server.
    {:links, links} = Process.info(server, :links)

    [httpd] =
      for pid <- links,
          is_pid(pid),
          {:dictionary, dictionary} <- [Process.info(pid, :dictionary)],
          dictionary[:"$initial_call"] == {:supervisor, :httpd_sup, 1},
          do: pid

    ref = Process.monitor(httpd)
    :ok = stop_supervised({Server, name})
    assert_receive {:DOWN, ^ref, _, _, _}
    # The listening socket closes with httpd; a connection racing that close
    # may be reset rather than refused, but none is ever served again.
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
