defmodule Capsid.HostileTest do
  @moduledoc """
  What Capsid does with hostile components (`Capsid.Hostile`,
  test/fixtures/hostile/): names, counts and sizes that come from a
  component never exhaust the VM's atoms, mappings or address space, never
  wedge an instance, and are refused with errors that name the limit.
  """
  use ExUnit.Case, async: true

  alias Capsid.{Error, Hostile, Instance, Trap}

  @moduletag timeout: 300_000

  defp load(bytes), do: Capsid.Component.load(bytes, cache: false)

  defp start(component, opts \\ []) do
    Instance.start_link([component: component] ++ opts)
  end

  describe "atoms" do
    test "a component whose names would create more atoms than its budget is refused, creating none" do
      bytes = Hostile.enum_bomb(3, 5_000)
      assert {:error, %Error{kind: :resource_limit, message: m}} = load(bytes)
      assert [_, n] = Regex.run(~r/would create (\d+) new atoms/, m)
      assert String.to_integer(n) > 10_000
      assert m =~ "max_atoms_per_component"

      for name <- ["e0_c4000", "e1_c2500", "e2_c4999"] do
        assert_raise ArgumentError, fn -> String.to_existing_atom(name) end
      end
    end

    test "names too long to be atoms are refused at load, not at a call" do
      for bytes <- [Hostile.long_enum_names(300), Hostile.long_names(300)] do
        assert {:error, %Error{kind: :resource_limit, message: m}} = load(bytes)
        assert m =~ "at most 255 bytes"
      end

      assert {:ok, _} = load(Hostile.long_enum_names(200))
    end

    test "an exponentially large type is refused at load" do
      assert {:error, %Error{kind: :resource_limit, message: m}} = load(Hostile.deep_type(18))
      assert m =~ "max_type_nodes"
      assert {:ok, c} = load(Hostile.deep_type(8))
      {:ok, i} = start(c)
      assert {:ok, tuple} = Capsid.call(i, "deep", [])
      assert is_tuple(tuple)
    end
  end

  describe "memories, tables, handles" do
    test "an instance may not create more memories than max_memories; the limit is named" do
      {:ok, c} = load(Hostile.memories(100, 1))
      assert {:error, %Error{kind: :resource_limit, message: m}} = start(c)
      assert m =~ "max_memories"
    end

    test "thousands of instances of a 100-memory component cost the VM no mappings" do
      {:ok, c} = load(Hostile.memories(100, 0))
      maps_before = mappings()

      instances =
        for _ <- 1..1_000 do
          {:ok, i} = start(c, max_memories: 100)
          i
        end

      assert {:ok, 42} = Capsid.call(List.last(instances), "ok", [])
      grew = mappings() - maps_before
      assert grew < 200, "the process gained #{grew} mappings for 1,000 instances"
      Enum.each(instances, &GenServer.stop/1)
    end

    test "tables count against max_memory" do
      {:ok, c} = load(Hostile.tables(10, 100_000))

      assert {:error, %Trap{kind: :memory_limit, message: m}} =
               start(c, max_memory: 4 * 1024 * 1024)

      assert m =~ "max_memory"
      assert {:ok, i} = start(c, max_memory: 16 * 1024 * 1024)
      assert {:ok, 42} = Capsid.call(i, "ok", [])
    end

    test "a guest that leaks handles stops at max_handles" do
      {:ok, c} = load(Hostile.handle_leak())
      {:ok, i} = start(c, max_handles: 1_000)
      assert {:ok, 500} = Capsid.call(i, "leak", [500])

      assert {:error, %Trap{kind: :memory_limit, message: m}} = Capsid.call(i, "leak", [5_000])
      assert m =~ "max_handles"
      assert {:ok, 10} = Capsid.call(i, "leak", [10])
    end

    test "a result that aliases the same bytes many times stops at the lift allowance" do
      {:ok, c} = load(Hostile.amplify(100_000, 65_536))
      {:ok, i} = start(c)
      assert {:error, %Trap{kind: :memory_limit, message: m}} = Capsid.call(i, "amp", [])
      assert m =~ "max_memory"
    end

    test "an instance with too many core instances is refused, naming the limit" do
      {:ok, c} = load(Hostile.many_instances(200))
      assert {:error, %Error{kind: :resource_limit, message: m}} = start(c, max_memories: 1_000)
      assert m =~ "max_instances"
    end
  end

  describe "time" do
    test "a start function that never returns ends at the timeout" do
      {:ok, c} = load(Hostile.start_loop())
      {us, result} = :timer.tc(fn -> start(c, timeout: 200, fuel: :infinity) end)
      assert {:error, %Trap{kind: :timeout}} = result
      assert us < 5_000_000
    end

    test "10,000 imports link fast; errors about them stay short" do
      {:ok, c} = load(Hostile.many_imports(10_000))
      imports = Map.new(0..9_999, &{"i#{&1}", fn -> :ok end})
      {us, result} = :timer.tc(fn -> start(c, imports: imports) end)
      assert {:ok, _} = result
      assert us < 10_000_000, "took #{div(us, 1000)} ms"

      assert {:error, %Error{kind: :link, message: m}} = start(c)
      assert byte_size(m) < 2_000
    end

    test "an unknown function in 20,000 exports gets a short error" do
      {:ok, c} = load(Hostile.many_exports(20_000))
      {:ok, i} = start(c)
      assert {:error, %Error{kind: :unknown_function, message: m}} = Capsid.call(i, "nope", [])
      assert byte_size(m) < 2_000
      assert m =~ "19988 more"
    end
  end

  defp mappings do
    "/proc/self/maps" |> File.read!() |> String.split("\n", trim: true) |> length()
  end
end
