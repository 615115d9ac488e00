defmodule Capsid.WASITest do
  @moduledoc """
  WASI capabilities granted one by one (`Capsid.WASI`), with the `probe`
  guest: deny by default, env/args/stdin, directories and their
  confinement, fixed clock, seeded randomness, sockets, outbound
  `wasi:http` (loopback only), `exit`.
  """
  use ExUnit.Case, async: true

  alias Capsid.Trap

  setup_all do
    %{probe: Capsid.Component.load!(Capsid.Guests.path(:probe))}
  end

  setup do
    root = Path.join(System.tmp_dir!(), "capsid-wasi-#{System.unique_integer([:positive])}")
    File.mkdir_p!(Path.join(root, "granted/sub"))
    File.write!(Path.join(root, "granted/hello.txt"), "hello")
    File.write!(Path.join(root, "secret.txt"), "secret")
    on_exit(fn -> File.rm_rf!(root) end)
    %{root: root, granted: Path.join(root, "granted")}
  end

  defp start(c, wasi) do
    start_supervised!({Capsid.Instance, component: c, wasi: wasi}, id: make_ref())
  end

  test "deny by default: no environment, arguments, directories or stdin", %{probe: c} do
    pid = start(c, [])
    assert Capsid.call(pid, "env", []) == {:ok, []}
    assert Capsid.call(pid, "args", []) == {:ok, []}
    assert Capsid.call(pid, "read-stdin", []) == {:ok, ""}
    assert {:ok, {:error, _}} = Capsid.call(pid, "read-file", ["/etc/passwd"])
    assert {:ok, {:error, _}} = Capsid.call(pid, "list-dir", ["/"])
  end

  test "env, args and stdin as granted", %{probe: c} do
    pid = start(c, env: %{"LANG" => "C.UTF-8", "B" => "2"}, args: ["plugin", "--fast"], stdin: "in")
    assert Capsid.call(pid, "env", []) == {:ok, [{"B", "2"}, {"LANG", "C.UTF-8"}]}
    assert Capsid.call(pid, "args", []) == {:ok, ["plugin", "--fast"]}
    assert Capsid.call(pid, "read-stdin", []) == {:ok, "in"}
  end

  test "a read-only directory: read, list; no write, create, rename or delete",
       %{probe: c, granted: granted} do
    pid = start(c, dirs: [{granted, "/data", :read_only}])
    assert Capsid.call(pid, "read-file", ["/data/hello.txt"]) == {:ok, {:ok, "hello"}}
    assert Capsid.call(pid, "list-dir", ["/data"]) == {:ok, {:ok, ["hello.txt", "sub"]}}
    assert {:ok, {:error, _}} = Capsid.call(pid, "write-file", ["/data/new.txt", "x"])
    assert {:ok, {:error, _}} = Capsid.call(pid, "write-file", ["/data/hello.txt", "x"])
    assert {:ok, {:error, _}} = Capsid.call(pid, "make-dir", ["/data/d"])
    assert {:ok, {:error, _}} = Capsid.call(pid, "rename", ["/data/hello.txt", "/data/h.txt"])
    assert {:ok, {:error, _}} = Capsid.call(pid, "remove-file", ["/data/hello.txt"])
    assert File.read!(Path.join(granted, "hello.txt")) == "hello"
    assert File.ls!(granted) |> Enum.sort() == ["hello.txt", "sub"]
  end

  test "a read-write directory: write, create, rename, delete inside it",
       %{probe: c, granted: granted} do
    pid = start(c, dirs: [{granted, "/data", :read_write}])
    assert Capsid.call(pid, "write-file", ["/data/new.txt", "new"]) == {:ok, :ok}
    assert File.read!(Path.join(granted, "new.txt")) == "new"
    assert Capsid.call(pid, "make-dir", ["/data/d"]) == {:ok, :ok}
    assert Capsid.call(pid, "rename", ["/data/new.txt", "/data/d/moved.txt"]) == {:ok, :ok}
    assert File.read!(Path.join(granted, "d/moved.txt")) == "new"
    assert Capsid.call(pid, "remove-file", ["/data/d/moved.txt"]) == {:ok, :ok}
    refute File.exists?(Path.join(granted, "d/moved.txt"))
  end

  test "the guest cannot leave a granted directory", %{probe: c, granted: granted, root: root} do
    File.ln_s!(Path.join(root, "secret.txt"), Path.join(granted, "link.txt"))
    File.ln_s!(root, Path.join(granted, "up"))
    pid = start(c, dirs: [{granted, "/data", :read_write}])

    for path <- [
          "/data/../secret.txt",
          "/data/sub/../../secret.txt",
          Path.join(root, "secret.txt"),
          "/data/link.txt",
          "/data/up/secret.txt"
        ] do
      assert {:ok, {:error, _}} = Capsid.call(pid, "read-file", [path]), path
    end

    for path <- ["/data/../escaped.txt", "/data/up/escaped.txt", "/data/link.txt"] do
      assert {:ok, {:error, _}} = Capsid.call(pid, "write-file", [path, "x"]), path
    end

    refute File.exists?(Path.join(root, "escaped.txt"))
    assert File.read!(Path.join(root, "secret.txt")) == "secret"
    # `..` that stays inside is fine.
    assert Capsid.call(pid, "read-file", ["/data/sub/../hello.txt"]) == {:ok, {:ok, "hello"}}
  end

  test "a fixed clock and seeded randomness", %{probe: c} do
    at = ~U[2026-01-01 00:00:00Z]
    a = start(c, clock: {:fixed, at}, random: {:seed, 42})
    b = start(c, clock: {:fixed, at}, random: {:seed, 42})
    other = start(c, random: {:seed, 43})
    assert Capsid.call(a, "now", []) == {:ok, DateTime.to_unix(at)}
    assert Capsid.call!(a, "random", []) == Capsid.call!(b, "random", [])
    refute Capsid.call!(a, "random", []) == Capsid.call!(other, "random", [])
    assert_in_delta Capsid.call!(other, "now", []), System.os_time(:second), 5
  end

  test "seeded randomness: every seed's streams are its own, and repeat", %{probe: c} do
    # Three numbers of each stream, and the insecure seed, per seed.
    streams = fn seed ->
      pid = start(c, random: {:seed, seed})
      pairs = for _ <- 1..3, do: Capsid.call!(pid, "random", [])
      {secure, insecure} = Enum.unzip(pairs)
      %{secure: secure, insecure: insecure, seed: Capsid.call!(pid, "random-seed", [])}
    end

    all = Map.new(0..50, &{&1, streams.(&1)})
    outputs = for {n, s} <- all, {label, out} <- s, do: {out, {n, label}}

    # Consecutive seeds once shared streams (seed 1's secure stream was seed
    # 0's insecure one): no stream of any seed equals another's.
    dupes =
      outputs
      |> Enum.group_by(&elem(&1, 0), &elem(&1, 1))
      |> Enum.filter(fn {_out, owners} -> length(owners) > 1 end)

    assert dupes == []
    # Deterministic: the same seed gives the same numbers.
    assert streams.(1) == all[1]
    assert streams.(50) == all[50]
  end

  test "exit ends the call with kind :exit and its status; the instance recycles", %{probe: c} do
    pid = start(c, [])

    assert {:error, %Trap{kind: :exit, status: 1, message: msg}} = Capsid.call(pid, "quit", [3])
    refute msg =~ "\n"
    assert msg =~ "status 1"
    assert {:error, %Trap{kind: :exit, status: 0}} = Capsid.call(pid, "quit", [0])
    assert %{recycles: 2, traps: %{exit: 2}} = Capsid.Instance.info(pid)
    assert Capsid.call(pid, "args", []) == {:ok, []}
  end

  describe "output" do
    test "by default stdout is dropped and stderr only comes with a trap", %{probe: c} do
      pid = start(c, [])
      assert Capsid.call(pid, "say", ["out", "err"]) == {:ok, nil}
      refute Map.has_key?(Capsid.Instance.info(pid), :stdout)
    end

    test ":capture keeps the newest output in info/1", %{probe: c} do
      pid = start(c, stdout: :capture, stderr: :capture)
      Capsid.call!(pid, "say", ["one ", "e1 "])
      Capsid.call!(pid, "say", ["two", "e2"])
      assert %{stdout: "one two", stderr: "e1 e2"} = Capsid.Instance.info(pid)
      # A chatty guest: each call keeps 64 KiB per stream, the instance the newest 64 KiB.
      Capsid.call!(pid, "say", [String.duplicate("x", 100_000), ""])
      assert %{stdout: out} = Capsid.Instance.info(pid)
      assert byte_size(out) == 65_536
      assert out =~ "more bytes dropped]"
    end

    test "{:send, pid} sends each call's output, nothing when there is none", %{probe: c} do
      pid = start(c, stdout: {:send, self()}, stderr: {:send, self()})
      Capsid.call!(pid, "say", ["hello", "warn"])
      assert_receive {:capsid_output, ^pid, :stdout, "hello"}
      assert_receive {:capsid_output, ^pid, :stderr, "warn"}
      Capsid.call!(pid, "say", ["", ""])
      refute_receive {:capsid_output, _, _, _}, 50
    end

    test "a trap's stderr comes with the trap and is routed too" do
      c = Capsid.Component.load!(Capsid.Guests.path(:faulty))

      pid =
        start_supervised!(
          {Capsid.Instance,
           component: c, imports: %{"hook" => & &1}, wasi: [stderr: {:send, self()}]},
          id: make_ref()
        )

      assert {:error, %Trap{stderr: stderr}} = Capsid.call(pid, "panic-with", ["oops"])
      assert stderr =~ "oops"
      assert_receive {:capsid_output, ^pid, :stderr, ^stderr}
    end

    test ":logger logs each call's output with the instance", %{probe: c} do
      pid = start(c, stdout: {:logger, :warning}, stderr: :discard)

      log =
        ExUnit.CaptureLog.capture_log([metadata: [:capsid_stream]], fn ->
          Capsid.call!(pid, "say", ["to the log", "not this"])
        end)

      assert log =~ "to the log"
      assert log =~ "capsid_stream=stdout"
      refute log =~ "not this"
    end

    # Each event as the log shows it, between markers (other async tests may
    # log meanwhile: only events with `tag` count).
    defp events(tag, fun) do
      [format: "<EV>$message</EV>\n", colors: [enabled: false]]
      |> ExUnit.CaptureLog.capture_log(fun)
      |> String.split("</EV>\n", trim: true)
      |> Enum.map(&String.replace_prefix(&1, "<EV>", ""))
      |> Enum.filter(&(&1 =~ tag))
    end

    test ":logger: one event per guest line, control characters escaped", %{probe: c} do
      pid = start(c, stdout: :logger, stderr: :discard)
      tag = "t#{System.unique_integer([:positive])}"

      # A guest forging a second log line and colouring the rest of it.
      out = "#{tag} ok\n[error] #{tag} forged\e[31m red\r\n#{tag} c1\u0085\u009b2J \x7f\a\tend\n"
      assert [first, second, third] = events(tag, fn -> Capsid.call!(pid, "say", [out, ""]) end)

      assert first == "#{tag} ok"
      assert second == "[error] #{tag} forged\\e[31m red"
      assert third == "#{tag} c1\\u{85}\\u{9B}2J \\x7F\\x07\tend"

      for event <- [first, second, third] do
        refute event =~ ~r/[\x00-\x08\x0a-\x1f\x7f]/
        refute event =~ ~r/[\x{80}-\x{9f}]/u
      end
    end

    test ":logger: invalid UTF-8 made safe, a long line bounded", %{probe: c} do
      pid = start(c, stdout: :logger, stderr: :discard)
      tag = "t#{System.unique_integer([:positive])}"
      long = tag <> String.duplicate("y", 20_000)
      assert [event] = events(tag, fn -> Capsid.call!(pid, "say", [long, ""]) end)
      assert byte_size(event) < 5_000
      assert event =~ ~r/\A#{tag}y+… \[capsid: \d+ more bytes\]\z/

      # The probe's `say` takes a string; a guest writes any bytes.
      bytes = <<tag::binary, " a", 0xFF, 0xC3, "b\u202Eevil\n">>

      assert [event] =
               events(tag, fn ->
                 Capsid.WASI.deliver({{{:logger, :info}, :discard}, pid, bytes, ""})
               end)

      assert event == "#{tag} a\\xFF\\xC3b\\u{202E}evil"

      # Many short lines: at most 1,000 events per call and stream.
      many = String.duplicate("#{tag}\n", 1_500)
      logged = events(tag, fn -> Capsid.call!(pid, "say", [many, ""]) end)
      assert length(logged) == 1_000

      assert ExUnit.CaptureLog.capture_log(fn -> Capsid.call!(pid, "say", [many, ""]) end) =~
               "[capsid: 500 more lines dropped]"
    end
  end

  describe "symlinks" do
    test "by default a guest may create a symlink pointing out of its read-write directory",
         %{probe: c, granted: granted, root: root} do
      pid = start(c, dirs: [{granted, "/data", :read_write}])
      # (An absolute target is refused: cap-std's rule. A relative one is not.)
      assert Capsid.call(pid, "symlink", [Path.join(root, "secret.txt"), "/data/abs"]) ==
               {:ok, {:error, "not-permitted"}}

      assert Capsid.call(pid, "symlink", ["../secret.txt", "/data/out"]) == {:ok, :ok}
      # The guest itself cannot follow it out...
      assert {:ok, {:error, _}} = Capsid.call(pid, "read-file", ["/data/out"])
      # ...but the host reading the directory later would.
      assert File.read_link!(Path.join(granted, "out")) == "../secret.txt"
      assert File.read!(Path.join(granted, "out")) == "secret"
    end

    test "symlinks: false refuses creating one, in the directory and below it",
         %{probe: c, granted: granted} do
      pid = start(c, dirs: [{granted, "/data", :read_write, symlinks: false}])

      for {target, path} <- [{"../secret.txt", "/data/out"}, {"../../secret.txt", "/data/sub/out"}] do
        assert Capsid.call(pid, "symlink", [target, path]) ==
                 {:ok, {:error, "not-permitted"}},
               path
      end

      # What else the directory grants still works.
      assert Capsid.call(pid, "write-file", ["/data/new.txt", "new"]) == {:ok, :ok}
      assert Capsid.call(pid, "hard-link", ["/data/new.txt", "/data/sub/new.txt"]) == {:ok, :ok}
      assert Capsid.call(pid, "rename", ["/data/new.txt", "/data/moved.txt"]) == {:ok, :ok}
      assert File.read!(Path.join(granted, "sub/new.txt")) == "new"
      refute File.exists?(Path.join(granted, "out"))
      refute File.exists?(Path.join(granted, "sub/out"))
    end

    test "symlinks: false holds against a symlink made in another directory and moved in",
         %{probe: c, granted: granted, root: root} do
      other = Path.join(root, "other")
      File.mkdir_p!(other)
      File.write!(Path.join(other, "plain.txt"), "plain")

      pid =
        start(c,
          dirs: [
            {granted, "/data", :read_write, symlinks: false},
            {other, "/other", :read_write},
            # Inside the guarded directory: still guarded.
            {Path.join(granted, "sub"), "/nested", :read_write}
          ]
        )

      assert Capsid.call(pid, "symlink", ["../../secret.txt", "/nested/out"]) ==
               {:ok, {:error, "not-permitted"}}

      assert Capsid.call(pid, "symlink", ["../secret.txt", "/other/link"]) == {:ok, :ok}
      assert {:ok, {:error, _}} = Capsid.call(pid, "hard-link", ["/other/link", "/data/l1"])
      assert {:ok, {:error, _}} = Capsid.call(pid, "rename", ["/other/link", "/data/l2"])
      # Not even a plain file comes in from outside (it could have been a link).
      assert {:ok, {:error, _}} = Capsid.call(pid, "rename", ["/other/plain.txt", "/data/p"])
      assert File.ls!(granted) |> Enum.sort() == ["hello.txt", "sub"]
      assert File.ls!(Path.join(granted, "sub")) == []
      # Out of it is fine.
      assert Capsid.call(pid, "rename", ["/data/hello.txt", "/other/hello.txt"]) == {:ok, :ok}
    end
  end

  test "pools and deployments take the option for every member", %{probe: c} do
    {:ok, pool} = Capsid.Pool.start_link(component: c, size: 2, wasi: [args: ["pooled"]])
    assert Capsid.call(pool, "args", []) == {:ok, ["pooled"]}

    name = {:wasi_test, make_ref()}
    {:ok, _} = Capsid.deploy(name, Capsid.Guests.path(:probe), size: 2, wasi: [env: %{"V" => "1"}])
    on_exit(fn -> Capsid.undeploy(name) end)
    assert Capsid.call(name, "env", []) == {:ok, [{"V", "1"}]}
  end

  # A loopback listener that reports each connection and answers every
  # request on it with `body` (or never answers, when `body` is nil).
  defp listener(body) do
    {:ok, listen} = :gen_tcp.listen(0, [:binary, ip: {127, 0, 0, 1}, active: false])
    {:ok, port} = :inet.port(listen)
    test = self()

    pid =
      spawn_link(fn ->
        accept = fn accept ->
          {:ok, socket} = :gen_tcp.accept(listen)
          send(test, {:connected, port})

          if body do
            {:ok, _request} = :gen_tcp.recv(socket, 0, 5_000)

            :gen_tcp.send(socket, [
              "HTTP/1.1 200 OK\r\ncontent-length: #{byte_size(body)}\r\n",
              "connection: close\r\n\r\n",
              body
            ])

            :gen_tcp.close(socket)
          end

          accept.(accept)
        end

        accept.(accept)
      end)

    on_exit(fn -> Process.exit(pid, :kill) end)
    port
  end

  test "sockets are denied: the guest's connect fails, nothing connects", %{probe: c} do
    port = listener(nil)
    pid = start(c, http: [allow: ["127.0.0.1"]])
    assert {:ok, {:error, message}} = Capsid.call(pid, "connect", ["127.0.0.1:#{port}"])
    assert message =~ "Permission denied"
    refute_received {:connected, ^port}
  end

  test "outbound HTTP: denied by default with wasi:http's error code, nothing sent",
       %{probe: c} do
    port = listener("hi")
    pid = start(c, [])

    assert Capsid.call(pid, "fetch", ["127.0.0.1:#{port}", "/"]) ==
             {:ok, {:error, "ErrorCode::HttpRequestDenied"}}

    pid = start(c, http: [allow: ["127.0.0.1:#{port + 1}", "localhost"]])

    assert Capsid.call(pid, "fetch", ["127.0.0.1:#{port}", "/"]) ==
             {:ok, {:error, "ErrorCode::HttpRequestDenied"}}

    refute_received {:connected, ^port}
  end

  test "outbound HTTP to an allowed authority; its body capped", %{probe: c} do
    port = listener(:binary.copy("z", 5_000))
    pid = start(c, http: [allow: ["127.0.0.1:#{port}"]])
    body = :binary.copy("z", 5_000)
    assert Capsid.call(pid, "fetch", ["127.0.0.1:#{port}", "/x"]) == {:ok, {:ok, {200, body}}}
    assert_received {:connected, ^port}

    pid = start(c, http: [allow: ["127.0.0.1"], max_response_body: 4_000])

    # The guest's body stream fails. (wasmtime-wasi-http 48 hands the guest
    # this error as text: its `http-error-code` finds no code in it.)
    assert {:ok, {:error, message}} = Capsid.call(pid, "fetch", ["127.0.0.1:#{port}", "/x"])
    assert message =~ "HTTP response body size exceeds limit: 4000 bytes"

    # A refused connection is the guest's error too.
    pid = start(c, http: [allow: ["127.0.0.1"]])

    assert Capsid.call(pid, "fetch", ["127.0.0.1:1", "/"]) ==
             {:ok, {:error, "ErrorCode::ConnectionRefused"}}
  end

  test "an outbound request counts against the call's timeout", %{probe: c} do
    port = listener(nil)
    pid = start(c, http: [allow: ["127.0.0.1"]])
    t0 = System.monotonic_time(:millisecond)

    assert {:error, %Trap{kind: :timeout}} =
             Capsid.call(pid, "fetch", ["127.0.0.1:#{port}", "/"], timeout: 300)

    assert System.monotonic_time(:millisecond) - t0 < 5_000
    assert_received {:connected, ^port}
    # The instance recycled and works.
    assert {:ok, _} = Capsid.call(pid, "now", [])
  end

  test "bad options are an ArgumentError naming the option", %{probe: c, root: root} do
    for {wasi, pattern} <- [
          {[env: %{"A" => 1}], "env"},
          {[args: "x"], "args"},
          {[dirs: [{Path.join(root, "missing"), "/d", :read_only}]], "does not exist"},
          {[dirs: [{root, "d", :read_only}]], "must be absolute"},
          {[dirs: [{root, "/d", :rw}]], ":read_only | :read_write"},
          {[dirs: [{root, "/d", :read_write, symlinks: :no}]], "symlinks: in wasi: [dirs"},
          {[dirs: [{root, "/d", :read_write, links: false}]], "unknown option :links"},
          {[dirs: [{root, "/d", :read_write, :nofollow}]], ":read_only | :read_write"},
          {[clock: :fake], "clock"},
          {[random: {:seed, -1}], "random"},
          {[stdin: 5], "stdin"},
          {[network: true], "network"},
          {[stdout: :terminal], "stdout"},
          {[stderr: {:logger, :loud}], "stderr"},
          {[http: [allow: ["https://x.test"]]], "invalid authority"},
          {[http: [max_response_body: -1]], "max_response_body"},
          {:all, ":wasi"}
        ] do
      error =
        assert_raise ArgumentError, fn -> Capsid.Instance.start_link(component: c, wasi: wasi) end

      assert error.message =~ pattern
    end
  end
end
