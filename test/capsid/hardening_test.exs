defmodule Capsid.HardeningTest do
  @moduledoc """
  Hostile inputs from callers, and hostile behaviour from guests: the call
  path is total (every input gets a result, no instance is ever left
  wedged), state is never lost to a failed upgrade, and large data never
  holds a scheduler.
  """
  import Capsid.TestHelpers
  use ExUnit.Case, async: true

  alias Capsid.{Error, Instance, Trap}

  @moduletag timeout: 180_000

  setup_all do
    %{
      faulty: Capsid.Component.load!(Capsid.Guests.path(:faulty)),
      bulk: Capsid.Component.load!(Capsid.Guests.path(:bulk))
    }
  end

  defp start_bulk(c, imports \\ %{}, opts \\ []) do
    imports =
      Map.merge(
        %{"fetch" => fn n -> List.duplicate(nil, n) end, "send" => &length/1},
        imports
      )

    start_supervised!(
      Supervisor.child_spec(
        {Instance, [component: c, imports: imports, max_memory: 1024 * 1024 * 1024] ++ opts},
        id: make_ref()
      )
    )
  end

  describe "the call path is total" do
    test "an improper list of arguments is a bad argument, and nothing is printed", %{
      faulty: c
    } do
      pid = start_instance(c)

      output =
        ExUnit.CaptureIO.capture_io(:stderr, fn ->
          assert {:error, %Error{kind: :bad_argument, message: m}} = Capsid.call(pid, "ok", [1 | 2])

          assert m =~ "proper list"
        end)

      assert output == ""
      assert Capsid.call(pid, "ok", [1]) == {:ok, 2}
    end

    test "an improper list deep inside an argument", %{bulk: c} do
      pid = start_bulk(c)

      assert {:error, %Error{kind: :bad_argument, message: m}} =
               Capsid.call(pid, "sum-options", [[1, 2 | 3]])

      assert m =~ "args[0]"
      assert Capsid.call(pid, "sum-options", [[1, nil, 2]]) == {:ok, 3}
    end

    test "an import answering an improper list traps; the instance answers the next call", %{
      bulk: c
    } do
      pid = start_bulk(c, %{"fetch" => fn _ -> [1, 2 | :tail] end})

      assert {:error, %Trap{kind: :import_failed, message: m}} = Capsid.call(pid, "call-fetch", [3])

      assert m =~ "proper list"
      assert {:ok, 3} = Capsid.call(pid, "sum-options", [[1, 2]])
    end

    test "timeout: :infinity with an import that takes a while", %{faulty: c} do
      pid =
        start_instance(c,
          timeout: :infinity,
          fuel: 10_000_000_000,
          hook: fn x ->
            Process.sleep(20)
            x * 2
          end
        )

      assert Capsid.call(pid, "call-hook", [21]) == {:ok, 42}
      assert Capsid.call(pid, "call-hook", [1], timeout: :infinity) == {:ok, 2}
    end

    test "a process that is not a Capsid instance is :instance_down and is never touched" do
      {:ok, agent} = Agent.start_link(fn -> :state end)
      plain = spawn(fn -> Process.sleep(:infinity) end)
      Process.register(plain, :hardening_plain_process)

      for target <- [agent, plain, :hardening_plain_process, {:global, :nope}] do
        {us, result} = :timer.tc(fn -> Capsid.call(target, "add", [1, 2]) end)
        assert {:error, %Error{kind: :instance_down}} = result
        assert us < 100_000, "#{inspect(target)} took #{us} µs"
      end

      assert Process.info(agent, :message_queue_len) == {:message_queue_len, 0}
      assert Process.info(plain, :message_queue_len) == {:message_queue_len, 0}
      assert Agent.get(agent, & &1) == :state
    end

    test "an instance whose process dies: running and queued calls end with results, no raise",
         %{faulty: c} do
      test = self()

      hook = fn x ->
        send(test, {:in_hook, self()})

        receive do
          :go -> x
        end
      end

      {:ok, pid} = Instance.start(component: c, imports: %{"hook" => hook}, timeout: 30_000)

      running = Task.async(fn -> Capsid.call(pid, "call-hook", [5]) end)
      assert_receive {:in_hook, hook_runner}, 5_000

      queued = for _ <- 1..3, do: Task.async(fn -> Capsid.call(pid, "ok", [1]) end)
      wait_until(fn -> Instance.info(pid).waiting == 3 end)

      Process.exit(pid, :kill)

      for t <- queued do
        assert {:error, %Error{kind: :instance_down}} = Task.await(t, 10_000)
      end

      send(hook_runner, :go)
      assert Task.await(running, 10_000) == {:ok, 5}
      assert {:error, %Error{kind: :instance_down}} = Capsid.call(pid, "ok", [1])
    end

    test "a killed caller's output never shows up in the next caller's trap", %{faulty: c} do
      test = self()

      pid =
        start_instance(c,
          hook: fn x ->
            send(test, :hooked)
            Process.sleep(:infinity)
            x
          end
        )

      caller = spawn(fn -> Capsid.call(pid, "chatty-hook", ["FROM-THE-KILLED-CALLER", 1]) end)
      assert_receive :hooked, 5_000
      Process.exit(caller, :kill)

      assert {:error, %Trap{kind: :unreachable, stderr: stderr}} =
               Capsid.call(pid, "panic-with", ["mine"])

      refute stderr =~ "FROM-THE-KILLED-CALLER"
      assert stderr =~ "mine"
    end

    test "an import stops when its caller is killed: no side effect after :cancelled", %{
      faulty: c
    } do
      test = self()

      hook = fn x ->
        send(test, {:started, self()})
        Process.sleep(300)
        send(test, :side_effect)
        x
      end

      pid = start_instance(c, hook: hook)
      caller = spawn(fn -> Capsid.call(pid, "call-hook", [1]) end)
      assert_receive {:started, runner}, 5_000
      Process.exit(caller, :kill)
      ref = Process.monitor(runner)
      assert_receive {:DOWN, ^ref, :process, ^runner, _}, 1_000
      refute_receive :side_effect, 600
      assert %{traps: %{cancelled: 1}} = Instance.info(pid)
      assert Capsid.call(pid, "ok", [1]) == {:ok, 2}
    end
  end

  describe "values" do
    test "option<enum { nil, ... }> tells some(nil) from none" do
      pid = start_toolkit()
      assert Capsid.call(pid, "echo-maybe-tristate", [nil]) == {:ok, nil}
      assert Capsid.call(pid, "echo-maybe-tristate", [{:some, nil}]) == {:ok, {:some, nil}}
      assert Capsid.call(pid, "echo-maybe-tristate", [{:some, :yes}]) == {:ok, {:some, :yes}}

      assert {:error, %Error{kind: :bad_argument, message: m}} =
               Capsid.call(pid, "echo-maybe-tristate", [:yes])

      assert m =~ "{:some, value}"
    end

    test "an f32 argument out of range is refused, not turned into :infinity" do
      pid = start_toolkit()

      assert {:error, %Error{kind: :bad_argument, message: m}} =
               Capsid.call(pid, "echo-f32", [1.0e39])

      assert m =~ "out of the range of f32"
      assert Capsid.call(pid, "echo-f32", [:infinity]) == {:ok, :infinity}
      assert {:ok, f} = Capsid.call(pid, "echo-f32", [3.4e38])
      assert_in_delta f, 3.4e38, 1.0e32
    end
  end

  describe "bulk data flows whole and fast wherever it sits in a signature" do
    @size 20 * 1024 * 1024

    test "a 20 MiB list<u8> inside a record, both ways", %{bulk: c} do
      pid = start_bulk(c)
      assert {:ok, blob} = Capsid.call(pid, "make-blob", ["big", @size])
      assert byte_size(blob.data) == @size
      assert blob.tags == ["bulk", "fixture"]
      expected = Enum.sum(for i <- 0..250, do: i * div(@size, 251)) + partial(@size) + 2
      assert Capsid.call(pid, "blob-digest", [blob]) == {:ok, expected}
      assert {:ok, ^blob} = Capsid.call(pid, "echo-blob", [blob])
    end

    test "bulk bytes between other parameters", %{bulk: c} do
      pid = start_bulk(c)
      data = :binary.copy(<<1>>, @size)
      assert Capsid.call(pid, "bytes-and-more", [7, data, "abc"]) == {:ok, 7 + 3 + @size}
    end
  end

  defp partial(size) do
    rest = rem(size, 251)
    Enum.sum(for i <- 0..(rest - 1)//1, do: i)
  end

  describe "upgrades never lose state" do
    setup do
      name = {:hardening, System.unique_integer([:positive])}
      on_exit(fn -> Capsid.undeploy(name) end)
      %{name: name, stateful: Capsid.Guests.path(:stateful)}
    end

    test "a snapshot that traps fails the upgrade and leaves the instance exactly as it was",
         %{name: name, stateful: path} do
      {:ok, _} = Capsid.deploy(name, path, size: 1)
      for _ <- 1..6, do: {:ok, _} = Capsid.call(name, "bump", [])
      {:ok, nil} = Capsid.call(name, "fill", [1000, 3])
      {:ok, before} = Capsid.call(name, "digest", [])
      {:ok, nil} = Capsid.call(name, "break-snapshot", [])

      assert {:error, %Error{message: m}} = Capsid.deploy(name, path)
      assert m =~ "snapshot refused"
      assert {:ok, %{current: %{version: 1}}} = Capsid.versions(name)

      assert Capsid.call(name, "digest", []) == {:ok, before}
      assert Capsid.call(name, "bump", []) == {:ok, 7}
    end

    test "a state of 30 MB crosses an upgrade whole", %{name: name, stateful: path} do
      {:ok, _} = Capsid.deploy(name, path, size: 1, max_memory: 512 * 1024 * 1024)
      {:ok, nil} = Capsid.call(name, "fill", [30_000_000, 7])
      {:ok, 1} = Capsid.call(name, "bump", [])
      {:ok, before} = Capsid.call(name, "digest", [])

      assert {:ok, %{current: %{version: 2}}} = Capsid.deploy(name, path, force: true)
      assert Capsid.call(name, "digest", []) == {:ok, before}
    end

    test "members dying during an upgrade fail it or not, but never crash the deployment",
         %{name: name, stateful: path} do
      {:ok, _} = Capsid.deploy(name, path, size: 2)
      [{deployment, _}] = Registry.lookup(Capsid.Deployments, name)
      pool = :sys.get_state(deployment).current.pool.pid

      killer =
        spawn(fn ->
          for _ <- 1..50 do
            for m <- Capsid.Pool.members(pool), do: Process.exit(m, :kill)
            Process.sleep(2)
          end
        end)

      results =
        for _ <- 1..5 do
          ExUnit.CaptureLog.capture_log(fn ->
            send(self(), Capsid.deploy(name, path, force: true))
          end)

          assert_received result
          result
        end

      Process.exit(killer, :kill)
      assert Enum.all?(results, &match?({tag, _} when tag in [:ok, :error], &1))
      assert [{^deployment, _}] = Registry.lookup(Capsid.Deployments, name)
      wait_until(fn -> match?({:ok, _}, Capsid.call(name, "bump", [])) end)
    end
  end

  describe "files that are not regular files" do
    @tag :tmp_dir
    test "a watched path replaced by a FIFO does not block the deployment", %{tmp_dir: dir} do
      name = {:fifo, System.unique_integer([:positive])}
      path = Path.join(dir, "greeter.wasm")
      File.cp!(Capsid.Guests.path(:greeter_v1), path)
      {:ok, _} = Capsid.deploy(name, path, size: 1, watch: true, watch_interval: 20)
      File.rm!(path)
      {_, 0} = System.cmd("mkfifo", [path])
      Process.sleep(100)
      assert {:ok, %{current: %{version: 1}}} = Capsid.versions(name)
      assert :ok = Capsid.undeploy(name)
    end

    @tag :tmp_dir
    test "a path that is a FIFO or a directory is a file error, not a hang", %{tmp_dir: dir} do
      fifo = Path.join(dir, "fifo.wasm")
      {_, 0} = System.cmd("mkfifo", [fifo])

      task = Task.async(fn -> Capsid.Component.load(fifo) end)
      assert {:error, %Error{kind: :file_error}} = Task.await(task, 5_000)
      assert {:error, %Error{kind: :file_error}} = Capsid.Component.load(dir)
    end
  end
end
