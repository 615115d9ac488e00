defmodule Capsid.HTTPTest do
  @moduledoc """
  `Capsid.HTTP.handle/3` and outbound `wasi:http`, with the `wasi:http/proxy`
  components componentize-js built from a `fetch` handler
  (test/fixtures/foreign/http_js/README.md). Loopback addresses only: the
  upstream servers are OTP's `:inets` httpd and bare `:gen_tcp` listeners.
  """
  use ExUnit.Case, async: true

  import Capsid.TestHelpers, only: [in_background: 3]

  alias Capsid.{Error, Trap}

  @moduletag timeout: 300_000

  @v1 Path.expand("../fixtures/foreign/http_js/http_v1.wasm", __DIR__)
  @v2 Path.expand("../fixtures/foreign/http_js/http_v2.wasm", __DIR__)

  setup_all do
    # ~12 MB of SpiderMonkey each: compiled once (later loads hit the cache).
    %{v1: Capsid.Component.load!(@v1), v2: Capsid.Component.load!(@v2), upstream: upstream()}
  end

  # An httpd on a free loopback port serving two files.
  defp upstream do
    root =
      Path.join(System.tmp_dir!(), "capsid-http-upstream-#{System.unique_integer([:positive])}")

    File.mkdir_p!(root)
    File.write!(Path.join(root, "hello.txt"), "hello from upstream")
    File.write!(Path.join(root, "big.bin"), :binary.copy("x", 2_000_000))

    {:ok, pid} =
      :inets.start(
        :httpd,
        port: 0,
        bind_address: {127, 0, 0, 1},
        server_name: ~c"upstream",
        server_root: String.to_charlist(root),
        document_root: String.to_charlist(root),
        modules: [:mod_get]
      )

    on_exit(fn -> :inets.stop(:httpd, pid) end)

    [port: port] = :httpd.info(pid, [:port])
    %{port: port, pid: pid}
  end

  defp start(component, opts \\ []) do
    start_supervised!({Capsid.Instance, [component: component] ++ opts}, id: make_ref())
  end

  defp get(target, path, opts \\ []),
    do: Capsid.HTTP.handle(target, %{method: "GET", path: path}, opts)

  defp fetch(target, url, opts \\ []),
    do: get(target, "/fetch?url=" <> URI.encode_www_form(url), opts)

  # A listener that accepts connections and never answers; reports each.
  defp silent_listener do
    {:ok, listen} = :gen_tcp.listen(0, [:binary, ip: {127, 0, 0, 1}, active: false])
    {:ok, port} = :inet.port(listen)
    test = self()

    pid =
      spawn_link(fn ->
        accept = fn accept, held ->
          case :gen_tcp.accept(listen, 100) do
            {:ok, socket} ->
              send(test, {:connected, port})
              accept.(accept, [socket | held])

            {:error, :timeout} ->
              accept.(accept, held)
          end
        end

        accept.(accept, [])
      end)

    on_exit(fn -> Process.exit(pid, :kill) end)
    port
  end

  describe "serving a wasi:http/proxy component" do
    test "routes, status, headers and body", %{v1: c} do
      pid = start(c)

      assert {:ok, %{status: 200, body: "hello from js v1", headers: headers}} = get(pid, "/")
      assert {"content-type", "text/plain"} in headers

      assert {:ok, %{status: 404, body: "not found"}} = get(pid, "/nope")
      assert {:ok, %{status: 404}} = Capsid.HTTP.handle(pid, %{method: :post, path: "/"})

      assert {:ok, %{status: 400, body: "missing url query parameter"}} = get(pid, "/fetch")
    end

    test "a binary body, the path and query as given, request headers", %{v1: c} do
      pid = start(c)
      body = :binary.list_to_bin(Enum.to_list(0..255)) |> :binary.copy(100)

      assert {:ok, %{status: 200, body: ^body, headers: headers}} =
               Capsid.HTTP.handle(pid, %{
                 method: "PUT",
                 path: "/echo/x?y=1&z=%20",
                 headers: [{"x-agent", "capsid-test"}],
                 body: [body]
               })

      assert {"x-method", "PUT"} in headers
      assert {"x-path", "/echo/x?y=1&z=%20"} in headers
      assert {"x-agent-seen", "capsid-test"} in headers

      assert {:ok, %{headers: headers}} = Capsid.HTTP.handle(pid, %{method: "POST", path: "/echo"})
      assert {"x-agent-seen", "none"} in headers
    end

    test "a handler that throws is the guest's 500, not a trap", %{v1: c} do
      pid = start(c, wasi: [stderr: :capture])
      assert {:ok, %{status: 500, body: ""}} = get(pid, "/boom")
      assert Capsid.Instance.info(pid).stderr =~ "boom from js v1"
      assert {:ok, %{status: 200}} = get(pid, "/")
    end

    test "100 sequential requests on one target, a fresh instance each", %{v1: c} do
      pid = start(c)
      before = Capsid.Instance.info(pid).instantiations

      for i <- 1..100 do
        assert {:ok, %{status: 200, body: body}} =
                 Capsid.HTTP.handle(pid, %{method: "POST", path: "/echo", body: "#{i}"})

        assert body == "#{i}"
      end

      # The first request is served by the instance made at start; each one
      # after by a new one.
      assert Capsid.Instance.info(pid).instantiations - before == 99
    end

    test "instance: :reuse keeps the instance; a guest that then does not answer is a trap",
         %{v1: c} do
      pid = start(c)
      assert {:ok, %{status: 200}} = get(pid, "/", instance: :reuse)

      # componentize-js answers one request per instance: the second gets
      # nothing, which is said, and the instance recycles.
      assert {:error, %Trap{kind: :other, message: message}} = get(pid, "/", instance: :reuse)
      assert message =~ "without setting a response"
      assert message =~ "instance: :fresh"

      assert {:ok, %{status: 200}} = get(pid, "/", instance: :reuse)
    end

    test "max_body caps the response body", %{v1: c} do
      pid = start(c)
      big = :binary.copy("y", 100_000)
      echo = %{method: "POST", path: "/echo", body: big}

      assert {:error, %Trap{kind: :memory_limit, message: message}} =
               Capsid.HTTP.handle(pid, echo, max_body: 50_000)

      assert message =~ "max_body (50000 bytes)"

      assert {:ok, %{body: ^big}} = Capsid.HTTP.handle(pid, echo, max_body: 100_000)
    end

    test "the request runs under the call's limits", %{v1: c} do
      pid = start(c)
      assert {:error, %Trap{kind: :out_of_fuel}} = get(pid, "/", fuel: 1_000)
      assert {:ok, %{status: 200}} = get(pid, "/")
    end

    test "a deployment swapped under a stream of requests: no request fails" do
      name = :"http_swap_#{System.unique_integer([:positive])}"
      on_exit(fn -> Capsid.undeploy(name) end)
      assert {:ok, _} = Capsid.deploy(name, @v1, size: 2)

      streams =
        for _ <- 1..2 do
          in_background([], 0, fn acc ->
            case get(name, "/") do
              {:ok, %{status: 200, body: "hello from js " <> v}} -> [v | acc]
              other -> [{:failed, other} | acc]
            end
          end)
        end

      Process.sleep(300)
      assert {:ok, _} = Capsid.deploy(name, @v2, size: 2)
      Process.sleep(300)
      results = Enum.flat_map(streams, fn stop -> Enum.reverse(stop.()) end)

      assert Enum.reject(results, &is_binary/1) == []
      assert "v1" in results and "v2" in results
      assert {:ok, %{body: "hello from js v2"}} = get(name, "/")
    end
  end

  describe "bad input" do
    test "invalid requests are :bad_argument errors naming the field", %{v1: c} do
      pid = start(c)

      for {request, field} <- [
            {%{method: "GET", path: "relative"}, ":path"},
            {%{method: "GE T", path: "/"}, ":method"},
            {%{method: 42, path: "/"}, ":method"},
            {%{method: "GET", path: "/", headers: [{"x", 1}]}, ":headers"},
            {%{method: "GET", path: "/", headers: :nope}, ":headers"},
            {%{method: "GET", path: "/", body: [1, :x]}, ":body"},
            {%{method: "GET", path: "/", scheme: :ftp}, ":scheme"},
            {%{method: "GET", path: "/", authority: 1}, ":authority"},
            {%{path: "/"}, "request"},
            {%{method: "GET", path: "/", headers: [{"bad name", "v"}]}, "header name"},
            {%{method: "GET", path: "/", headers: [{"x", "a\nb"}]}, "header x"},
            {%{method: "GET", path: "/", authority: "a b"}, "authority"},
            {%{method: "GET", path: "/a b"}, "path"}
          ] do
        assert {:error, %Error{kind: :bad_argument, message: message}} =
                 Capsid.HTTP.handle(pid, request)

        assert message =~ field
      end

      for opts <- [[instance: :shared], [max_body: 0], [max_body: :big]] do
        assert {:error, %Error{kind: :bad_argument}} = get(pid, "/", opts)
      end

      assert_raise ArgumentError, ~r/timeout/, fn -> get(pid, "/", timeout: -1) end
      assert_raise Error, ~r/:path/, fn -> Capsid.HTTP.handle!(pid, %{method: "GET", path: ""}) end

      # Nothing of that reached the guest or hurt the instance.
      assert Capsid.Instance.info(pid).calls == 0
      assert %{status: 200} = Capsid.HTTP.handle!(pid, %{method: "GET", path: "/"})
    end

    test "a component that is not a wasi:http/proxy one" do
      pid = start(Capsid.TestHelpers.toolkit(), imports: Capsid.TestHelpers.toolkit_imports())

      assert {:error, %Error{kind: :unknown_function, message: message}} = get(pid, "/")
      assert message =~ "does not export wasi:http/incoming-handler"
    end

    test "the handler export cannot be called with values", %{v1: c} do
      pid = start(c)

      assert {:error, %Error{kind: :bad_argument, message: message}} =
               Capsid.call(pid, "handle", [1, 2])

      assert message =~ "Capsid.HTTP.handle/3"
    end

    test "unknown targets" do
      assert {:error, %Error{}} = get(:no_such_capsid_target, "/")
    end
  end

  describe "outbound wasi:http" do
    test "denied by default: the guest sees a failed fetch, nothing is sent", %{v1: c} do
      port = silent_listener()
      pid = start(c)

      assert {:ok, %{status: 502, body: "NetworkError" <> _}} =
               fetch(pid, "http://127.0.0.1:#{port}/x")

      refute_received {:connected, ^port}
    end

    test "allowed by host:port or by host; other authorities denied", %{v1: c, upstream: up} do
      url = "http://127.0.0.1:#{up.port}/hello.txt"

      for allow <- [["127.0.0.1:#{up.port}"], ["127.0.0.1"], ["LOCALHOST", "127.0.0.1"]] do
        pid = start(c, wasi: [http: [allow: allow]])

        assert {:ok, %{status: 200, body: "hello from upstream", headers: headers}} =
                 fetch(pid, url)

        assert {"x-upstream-status", "200"} in headers
        assert {:ok, %{body: "hello from js v1"}} = get(pid, "/")
      end

      for allow <- [["127.0.0.1:#{up.port + 1}"], ["localhost"], ["127.0.0.2"]] do
        pid = start(c, wasi: [http: [allow: allow]])
        assert {:ok, %{status: 502}} = fetch(pid, url)
      end

      # An upstream error status is the guest's to see.
      pid = start(c, wasi: [http: [allow: ["127.0.0.1"]]])

      assert {:ok, %{status: 200, headers: headers}} =
               fetch(pid, "http://127.0.0.1:#{up.port}/missing")

      assert {"x-upstream-status", "404"} in headers
    end

    test "the response body a guest reads is capped", %{v1: c, upstream: up} do
      url = "http://127.0.0.1:#{up.port}/big.bin"

      pid = start(c, wasi: [http: [allow: ["127.0.0.1"], max_response_body: 1_000_000]])
      assert {:ok, %{status: 502}} = fetch(pid, url)

      pid = start(c, wasi: [http: [allow: ["127.0.0.1"], max_response_body: 4_000_000]])
      assert {:ok, %{status: 200, body: body}} = fetch(pid, url, max_body: 4_000_000)
      assert byte_size(body) == 2_000_000
    end

    test "a request that never gets an answer ends with the call's timeout", %{v1: c} do
      port = silent_listener()
      pid = start(c, wasi: [http: [allow: ["127.0.0.1:#{port}"]]])
      t0 = System.monotonic_time(:millisecond)

      assert {:error, %Trap{kind: :timeout}} = fetch(pid, "http://127.0.0.1:#{port}/", timeout: 500)

      elapsed = System.monotonic_time(:millisecond) - t0
      assert_received {:connected, ^port}
      assert elapsed >= 500 and elapsed < 5_000
      assert {:ok, %{status: 200}} = get(pid, "/")
    end

    test "bad http options are refused when the instance starts", %{v1: c} do
      for {http, message} <- [
            {[allow: ["http://example.test"]], "invalid authority"},
            {[allow: ["*.example.test"]], "invalid authority"},
            {[allow: ["example.test:99999"]], "invalid authority"},
            {[allow: ["example.test/x"]], "invalid authority"},
            {[allow: [:example]], "invalid authority"},
            {[allow: "example.test"], "expected a list"},
            {[max_response_body: 0], "max_response_body"},
            {[deny: []], "deny"},
            {:all, "http"}
          ] do
        error =
          assert_raise ArgumentError, fn ->
            Capsid.Instance.start_link(component: c, wasi: [http: http])
          end

        assert error.message =~ message
      end
    end
  end
end
